"""The scheduler's bookkeeping after the forward pass: a launched step's tokens count as computed (`advance`), and
its sampled tokens come back (`resolve`, `resolve_rows`, `resolve_steady`): they replace the placeholders, the
token-level stops apply (EOS, stop token ids, min/max tokens, context length) and a prompt forks into its n samples.

`StepUpdates` is the half of `Scheduler` (services/engine/scheduler.py) that runs after the step; the other half
decides the step. It reads the scheduler's queues (`running`, `waiting`), `blocks`, `namespace`, `config`,
`eos_token_ids` and stop-id table state, and ends sequences with its `finish` / `_finish`. No torch here.
"""

from __future__ import annotations

import sys

import numpy as np

from services.common.outputs import Logprob
from services.engine.request import PENDING, Request, SampledToken, Sequence, SeqStatus
from services.engine.scheduler_output import SchedulerOutput


class StepUpdates:
    """The after-the-step half of `Scheduler` (see the module docstring for what it reads of the scheduler)."""

    # --- after the forward pass -----------------------------------------------------------------
    # A step is launched (`advance`: its sequences' tokens count as computed, and a placeholder stands
    # for each token it samples) and later resolved (`resolve`: the sampled ids replace the
    # placeholders, stops apply). With asynchronous scheduling the next step is scheduled in between.
    def advance(self, out: SchedulerOutput, sampling: list[Sequence] = (), now: float | None = None) -> None:
        """The step is launched: count its tokens as computed, and append a placeholder (PENDING) for
        the token each sequence of `sampling` will get, so the next schedule sees it as a decode."""
        for s in out.scheduled:
            seq = s.seq
            start = seq.num_computed_tokens
            if start < seq.num_prompt_tokens:  # (a request is first scheduled for its prompt)
                self.num_computed_prompt_tokens += min(s.num_new_tokens, seq.num_prompt_tokens - start)
                req = seq.request
                if req.first_scheduled_time is None and now is not None:
                    req.first_scheduled_time = now
            seq.num_computed_tokens = start + s.num_new_tokens
        for seq in sampling:
            seq.token_ids.append(PENDING)
            seq.num_pending += 1
        if out.batch is not None:
            out.batch.advanced = True

    @staticmethod
    def advance_decodes(out: SchedulerOutput) -> None:
        """advance(out, out.seqs) for a step of plain decodes (`SchedulerOutput.plain_decode`), in one
        pass: each sequence computes one token and holds a placeholder for its row's sample."""
        if out.batch is not None:
            out.batch.advanced = True
        for row, seq in enumerate(out.seqs):
            seq.num_computed_tokens += 1
            seq.token_ids.append(PENDING)
            seq.num_pending += 1
            seq.pending_row = row

    def after_step(self, out: SchedulerOutput) -> None:
        """Advance each scheduled sequence and publish its newly full blocks to the prefix cache."""
        self.advance(out)
        for s in out.scheduled:
            self.blocks.mark_computed(s.seq, self.namespace)

    def update_from_output(self, out: SchedulerOutput, sampled: dict[int, list[SampledToken]],
                           now: float) -> dict[str, Request]:
        """advance() and resolve() in one (a step run synchronously, without placeholders)."""
        self.advance(out, now=now)
        return self.resolve(out, sampled, now)

    def resolve(self, out: SchedulerOutput, sampled: dict[int, list[SampledToken]],
                now: float) -> dict[str, Request]:
        """Take a launched step's sampled tokens: `sampled` maps a seq_id to its token, or to n tokens
        for a sequence whose request forks into its n samples now (the prompt is computed once; the
        siblings share its blocks). A sequence that ended while the step was in flight (abort, stop
        string, a stop on its previous token) drops its token. Returns the requests that got tokens.
        (`resolve_rows` is the same for a step without forks, with the batch's stops checked at once.)"""
        touched: dict[str, Request] = {}
        finished, running = SeqStatus.FINISHED, SeqStatus.RUNNING
        for s in out.scheduled:
            seq = s.seq
            if seq.status is finished:
                continue
            req = seq.request
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            tokens = sampled.get(seq.seq_id)
            if tokens and seq.num_pending:  # first: the placeholder may lie in the computed range
                seq.token_ids[len(seq.token_ids) - seq.num_pending] = tokens[0].token_id
            if seq.status is running:  # (one preempted meanwhile holds no blocks now)
                self.blocks.mark_computed(seq, self.namespace)
            if not tokens:
                continue
            if len(tokens) == 1:
                self.append_token(seq, tokens[0])
            else:
                for sq, tok in zip([seq] + self._fork_samples(seq, len(tokens) - 1), tokens):
                    self.append_token(sq, tok)
            if req.first_token_time is None:
                req.first_token_time = now
            touched[req.request_id] = req
        return touched

    def resolve_rows(self, out: SchedulerOutput, seqs: list[Sequence], token_ids: list[int],
                     token_array: np.ndarray, logprobs: list[float], top: list | None,
                     now: float) -> dict[str, Request]:
        """`resolve` for a step that forks nothing, given row by row: row i of the step's samples is
        `seqs[i]`'s token (`token_array` holds the same ids; `top`, when some row asked for logprobs,
        its (top ids, their logprobs, rank)). One pass writes the tokens; the stops are found for the
        whole batch at once (stop and EOS ids by one table lookup, lengths by one comparison per row)
        and only the rows they flag are checked one by one, in row order, with `_stop_reason`.
        Returns the requests that got tokens and stream them, and those a sequence of ended."""
        touched: dict[str, Request] = {}
        finished = SeqStatus.FINISHED
        last = (self.config.max_model_len or sys.maxsize) - 1  # the last position the context holds
        b = out.batch
        per_row = b is None or seqs is not b.seqs
        # (A decode batch's tokens land at positions + 1: its length ends are found at once.)
        hits = [] if per_row else np.flatnonzero(b.positions + 2 >= b.limits).tolist()
        for i, (seq, tok, lp) in enumerate(zip(seqs, token_ids, logprobs)):
            if seq.status is finished:
                continue
            tids = seq.token_ids
            k = seq.num_pending
            if k:
                pos = len(tids) - k
                tids[pos] = tok
                seq.num_pending = k - 1
            else:
                pos = len(tids)
                tids.append(tok)
            seq.cumulative_logprob += lp
            if top is not None and seq.logprobs is not None and top[i] is not None:
                seq.logprobs.append(_logprob_entry(tok, lp, top[i]))
            if per_row and (pos >= seq.max_num_tokens - 1 or pos >= last):
                hits.append(i)
            req = seq.request
            if req.first_token_time is None:
                req.first_token_time = now
            if req.stream:
                touched[req.request_id] = req
        return self._end_rows(out, seqs, token_ids, token_array, hits, touched)

    def resolve_steady(self, out: SchedulerOutput, nxt: SchedulerOutput, token_ids: list[int],
                       token_array: np.ndarray, logprobs: list[float], top: list | None,
                       now: float) -> dict[str, Request]:
        """`advance_decodes(nxt)` and then `resolve_rows(out, out.seqs, ...)`, in one pass, for a steady step
        `out` whose rows `nxt`, launched after it, decodes again (the same list of sequences: see
        `_schedule_steady`). Each row's last entry is `out`'s placeholder: the token replaces it and `nxt`'s
        placeholder follows, so the row's pending count and row index stay as they are."""
        nxt.batch.advanced = True
        touched: dict[str, Request] = {}
        finished = SeqStatus.FINISHED
        seqs, b = out.seqs, out.batch
        if b.lean:  # (no request to report or stamp: the per-row work is the sequence's own)
            for seq, tok, lp in zip(seqs, token_ids, logprobs):
                if seq.status is finished:  # (it ended while `out` was in flight)
                    continue
                tids = seq.token_ids
                tids[-1] = tok
                tids.append(PENDING)
                seq.num_computed_tokens += 1
                seq.cumulative_logprob += lp
        else:
            for seq, tok, lp in zip(seqs, token_ids, logprobs):
                if seq.status is finished:
                    continue
                tids = seq.token_ids
                tids[-1] = tok
                tids.append(PENDING)
                seq.num_computed_tokens += 1
                seq.cumulative_logprob += lp
                req = seq.request
                if req.first_token_time is None:
                    req.first_token_time = now
                if req.stream:
                    touched[req.request_id] = req
            nxt.batch.lean = not touched  # every request now has its first token time; none streams
        if top is not None:
            for seq, tok, lp, t in zip(seqs, token_ids, logprobs, top):
                if t is not None and seq.logprobs is not None and seq.status is not finished:
                    seq.logprobs.append(_logprob_entry(tok, lp, t))
        hits = np.flatnonzero(b.positions + 2 >= b.limits).tolist()  # (each token lands at positions + 1)
        return self._end_rows(out, seqs, token_ids, token_array, hits, touched)

    def _end_rows(self, out: SchedulerOutput, seqs: list[Sequence], token_ids: list[int], token_array: np.ndarray,
                  hits: list[int], touched: dict[str, Request]) -> dict[str, Request]:
        """The stops of a resolved step whose tokens are in place: rows `hits` (by length) and those whose
        token can stop something, checked in row order with `_stop_reason`."""
        finished = SeqStatus.FINISHED
        if self.blocks.enable_prefix_caching or self.blocks.sliding_window is not None:
            self._mark_resolved(out)
        table = self._stop_table()
        flagged = np.flatnonzero(table[np.minimum(token_array, len(table) - 1)])
        if len(flagged):
            hits = sorted(set(hits).union(flagged.tolist()))
        done = []
        for i in hits:
            seq = seqs[i]
            if seq.status is finished:
                continue
            pos = len(seq.token_ids) - seq.num_pending - 1
            reason, stop = self._stop_reason(seq, token_ids[i], pos)
            if reason is not None:
                if seq.status is SeqStatus.RUNNING:
                    done.append(seq)
                self._finish(seq, reason, stop)
                touched[seq.request.request_id] = seq.request
        if done:  # one pass over `running` instead of a list.remove per ended sequence
            gone = set(map(id, done))
            self.running[:] = [s for s in self.running if id(s) not in gone]
        return touched

    def _mark_resolved(self, out: SchedulerOutput) -> None:
        """Publish the step's newly full blocks (prefix caching) and release slid-out ones; before any
        sequence of the step ends, so its blocks are registered before they are freed."""
        running, mark, ns = SeqStatus.RUNNING, self.blocks.mark_computed, self.namespace
        for seq in out.seqs:
            if seq.status is running:  # (one preempted meanwhile holds no blocks now)
                mark(seq, ns)

    def _stop_table(self) -> np.ndarray:
        """table[t] is True for EOS and every stop token id seen (a sampled id outside them cannot stop
        its sequence); its last entry, past every such id, is False and stands for any larger id."""
        cached = self._stop_array
        if cached is None or cached[0] is not self.eos_token_ids or cached[1] != len(self._stop_ids_seen):
            ids = list(set(self.eos_token_ids) | self._stop_ids_seen)
            table = np.zeros(max(ids, default=-1) + 2, dtype=bool)
            table[ids] = True
            cached = self._stop_array = (self.eos_token_ids, len(self._stop_ids_seen), table)
        return cached[2]

    def _fork_samples(self, parent: Sequence, k: int) -> list[Sequence]:
        """Fork `parent` into k more samples that join the queue right after it, in one splice: linear
        in k (a per-child `list.index` + insert made a large n quadratic inside one step)."""
        req = parent.request
        children = [Sequence(req, len(req.seqs) + i, list(parent.token_ids), parent.num_prompt_tokens)
                    for i in range(k)]
        for child in children:
            child.num_cached_tokens = parent.num_cached_tokens
            if parent.status is SeqStatus.RUNNING:
                child.num_computed_tokens = parent.num_computed_tokens
                self.blocks.fork(parent, child)
                child.status = SeqStatus.RUNNING
            else:
                child.num_computed_tokens = 0
                child.status = SeqStatus.WAITING
        if children:
            queue = self.running if parent.status is SeqStatus.RUNNING else self.waiting
            if isinstance(queue, list):
                i = queue.index(parent) + 1
                queue[i:i] = children
            else:
                i = queue.index(parent) + 1
                queue.rotate(-i)
                queue.extendleft(reversed(children))
                queue.rotate(i)
        req.seqs.extend(children)
        return children

    def append_token(self, seq: Sequence, sample: SampledToken) -> None:
        """Append one sampled token (in place of its placeholder, if it has one) and end the sequence
        if a token-level stop says so."""
        token = sample.token_id
        if seq.num_pending:
            pos = len(seq.token_ids) - seq.num_pending
            seq.token_ids[pos] = token
            seq.num_pending -= 1
        else:
            seq.token_ids.append(token)
            pos = len(seq.token_ids) - 1
        seq.cumulative_logprob += sample.logprob
        if seq.logprobs is not None and sample.top is not None:
            seq.logprobs.append(_logprob_entry(token, sample.logprob, sample.top))
        reason, stop = self._stop_reason(seq, token, pos)
        if reason is not None:
            self.finish(seq, reason, stop)

    def _stop_reason(self, seq: Sequence, token: int, pos: int) -> tuple[str | None, int | None]:
        """The token-level stop (reason, stop token id) that `token`, at position `pos`, ends `seq` with:
        EOS (unless ignore_eos) or a stop token id once min_tokens are out, else max_tokens or the
        context length; (None, None) if none."""
        p = seq.params
        if pos + 1 - seq.num_prompt_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
        max_len = self.config.max_model_len
        if pos + 1 >= seq.max_num_tokens or (max_len is not None and pos + 1 >= max_len):
            return "length", None
        return None, None


def _logprob_entry(token: int, logprob: float, top: tuple[list[int], list[float], int]) -> dict[int, Logprob]:
    """A sampled token's logprob entry: itself (with its rank), then the top ids not already in it."""
    ids, lps, rank = top
    entry = {token: Logprob(logprob, rank)}
    for r, (t, v) in enumerate(zip(ids, lps)):
        entry.setdefault(t, Logprob(v, r + 1))
    return entry
