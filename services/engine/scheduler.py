"""Continuous batching: which sequences run in the next step and how many of their tokens.

One rule covers prefill, chunked prefill, prefix-cache hits and decode: every scheduled sequence
advances `num_computed_tokens` towards `len(token_ids)`, taking at most what is left of the step's
token budget. Running sequences go first (oldest first), so a decode is never starved by new
prompts; when blocks run out the newest running sequence is preempted (its blocks freed, to be
recomputed later). Waiting sequences are admitted in arrival order while blocks and budget allow.

The scheduler's output also says which rows of the step's logits belong to whom (`ScheduledSeq`),
one rule read by the model runner (which rows to compute) and the engine (which to sample), and
`update_from_output` takes the sampled tokens back: it appends them, applies the token-level stops
(EOS, stop token ids, min/max tokens, context length) and forks the n > 1 samples of a prompt.
No torch here.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from services.common.errors import QueueFullError
from services.common.outputs import Logprob
from services.engine.block_manager import BlockManager
from services.engine.input_batch import DecodeBatch
from services.engine.request import PENDING, Request, SampledToken, Sequence, SeqStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    """Most sequences in one step."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks plus decodes)."""
    max_waiting: int | None = None
    """Bound on waiting sequences; None means unbounded (the offline API)."""
    max_model_len: int | None = None
    """A sequence that reaches this many tokens ends with finish reason "length"; None: no limit here."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")


_NO_ROWS = range(0)


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    prompt_logprob_rows: range = _NO_ROWS
    """Rows of the step's logits holding this chunk's prompt positions (when prompt_logprobs were asked)."""
    sample_row: int | None = None
    """The logits row that predicts the sequence's next token, when this step catches it up."""


class _DecodeRows:
    """`SchedulerOutput.scheduled` of a steady decode step, made on demand: row i is `ScheduledSeq(seqs[i], 1,
    sample_row=i)` (the steady path builds no per-sequence object; only a step off the fast paths reads these)."""

    __slots__ = ("seqs",)

    def __init__(self, seqs: list[Sequence]):
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def __iter__(self):
        return (ScheduledSeq(seq, 1, _NO_ROWS, i) for i, seq in enumerate(self.seqs))

    def __getitem__(self, i: int) -> ScheduledSeq:
        return ScheduledSeq(self.seqs[i], 1, _NO_ROWS, range(len(self.seqs))[i])


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] | _DecodeRows = field(default_factory=list)
    seqs: list[Sequence] = field(default_factory=list)
    """The scheduled sequences, in order (`scheduled[i].seq`), for the passes that need only them."""
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """Copy-on-write (src, dst) block pairs to run before the step's forward pass."""
    preempted: list[Sequence] = field(default_factory=list)
    num_logit_rows: int = 0
    """How many logits rows the step computes (see ScheduledSeq)."""
    num_tokens: int = 0
    """Tokens the step computes (the sum of num_new_tokens)."""
    num_plain_decodes: int = 0
    """Scheduled sequences that decode one token into their own row and whose request is plain (n == 1,
    no beam, no penalties). When all are (the steady state), `advance_decodes` launches the step."""
    batch: DecodeBatch | None = None
    """A step of plain decodes: its rows as arrays (services/engine/input_batch.py), else None."""

    @property
    def plain_decode(self) -> bool:
        """Every scheduled sequence is a plain decode: row i is `seqs[i]`'s one token."""
        return self.num_plain_decodes == len(self.seqs)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, cache_namespace: object = None,
                 eos_token_ids: frozenset[int] = frozenset()):
        self.config = config
        self.blocks = block_manager
        self.namespace = cache_namespace
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_computed_prompt_tokens = 0
        self._stop_ids_seen: set[int] = set()
        """Every stop token id of a request ever added (a superset is all `_stop_table` needs)."""
        self._stop_array: tuple[object, int, np.ndarray] | None = None
        """(eos ids, len(_stop_ids_seen), `_stop_table`) as last built."""
        self._batch: DecodeBatch | None = None
        """The last step's rows when it decoded all of `running`, in order (the next may carry them on)."""
        self.num_steady_steps = 0
        """Steps scheduled from a carried decode batch (`_schedule_steady`), for benches and tests."""

    # --- queue ------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if self.config.max_waiting is not None and len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} requests)")
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        if seq.params.stop_token_ids:
            self._stop_ids_seen.update(seq.params.stop_token_ids)

    def add_running(self, seq: Sequence, after: Sequence) -> None:
        """A forked sequence joins the running set next to its parent (it holds blocks already)."""
        seq.status = SeqStatus.RUNNING
        self.running.insert(self.running.index(after) + 1, seq)

    def fork(self, parent: Sequence, child: Sequence, after: Sequence | None = None) -> None:
        """`child`, a copy of `parent`'s tokens, joins the queue right after it (or after `after`, an
        earlier sibling), for beam search and n > 1 sampling alike. A running parent shares its blocks
        (copy-on-write at the next append); a waiting (preempted) parent has none, and the child waits
        to be computed like it."""
        child.num_cached_tokens = parent.num_cached_tokens
        if parent.status is SeqStatus.RUNNING:
            child.num_computed_tokens = parent.num_computed_tokens
            self.blocks.fork(parent, child)
            self.add_running(child, after=after or parent)
        else:
            child.num_computed_tokens = 0
            child.status = SeqStatus.WAITING
            self.waiting.insert(self.waiting.index(parent) + 1, child)

    def finish(self, seq: Sequence, reason: str | None = None, stop_token_id: int | None = None) -> None:
        """Take a sequence out of the queues and give its blocks back (recording why it ended)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        self._finish(seq, reason, stop_token_id)

    def _finish(self, seq: Sequence, reason: str | None, stop_token_id: int | None) -> None:
        """finish(), except that a running sequence stays in `running` (the caller removes it)."""
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason, stop_token_id
        if seq.num_pending:  # a token still in flight for it is dropped when it arrives
            del seq.token_ids[-seq.num_pending:]
            seq.num_pending = 0
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        self.blocks.free(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def queue_shortfall(self) -> tuple[int, int | None]:
        """(sequences, prompt tokens) that more queued requests would have to bring before the next schedule
        could admit anything other than what it admits now. Admission stops at max_num_seqs running and at
        the step's token budget, so a queue that holds max_num_seqs with the running ones, or the budget's
        worth of uncomputed tokens, admits what any longer queue would: either figure <= 0 means enough.
        Tokens are None with prefix caching (a queued prompt's cached blocks would take less of the budget:
        only the sequence count tells then). The offline API queues its requests this far ahead of the
        schedule and the rest while the device runs the steps (folio/llm.py)."""
        c = self.config
        seqs = c.max_num_seqs - len(self.running) - len(self.waiting)
        if self.blocks.enable_prefix_caching:
            return seqs, None
        tokens = c.max_num_batched_tokens
        for seq in self.waiting:
            tokens -= seq.num_tokens - seq.num_computed_tokens
            if tokens <= 0:
                break
        return seqs, tokens

    # --- the step ---------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = self._schedule_steady()
        if out is not None:
            return out
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        # New work only when nothing had to be preempted: admitting it would just preempt again.
        if not out.preempted:
            budget = self._admit(out, budget)
        if not out.scheduled and not out.preempted and self.running and self.waiting:
            # Every running sequence is idle (beams waiting for a preempted sibling, see beam_search.py)
            # and nothing waiting fits: hand their blocks back so the queue, in order, can run.
            for seq in reversed(self.running):
                self._preempt(seq, out)
            self._admit(out, budget)
        self._batch = None
        if out.seqs and out.plain_decode:
            out.batch = DecodeBatch.build(out.seqs, self.blocks.tables, self.config.max_model_len)
            if out.seqs == self.running:
                self._batch = out.batch
        return out

    def _schedule_steady(self) -> SchedulerOutput | None:
        """The step after a launched step that decoded all of `running` (in order), when nothing changed
        since: the same rows decode again, one token each (services/engine/input_batch.py). What the
        general pass would check per sequence is checked on the batch's arrays; only a row whose token
        starts a new block calls the block manager, as in the general pass. None when the general pass
        must decide: the running set changed, a token in flight is some sequence's last (it is skipped
        there), the pool is short of blocks (it preempts), or a waiting sequence could be admitted."""
        last, running, c = self._batch, self.running, self.config
        if (last is None or not last.advanced or len(running) > c.max_num_batched_tokens
                or (self.waiting and len(running) < c.max_num_seqs) or running != last.seqs):
            return None
        b = last.advanced_batch()
        pos = b.positions
        if (pos >= b.limits - 1).any():  # (the general pass skips a sequence whose token in flight is its last)
            return None
        blocks = self.blocks
        edge = np.flatnonzero(pos % blocks.block_size == 0)  # these rows' tokens open a new block each
        if len(edge):
            if len(edge) > blocks.num_free_blocks:  # (the general pass preempts)
                return None
            # What try_append does for each in row order, at once: a plain sequence shares no block it writes.
            seqs = b.seqs
            blocks.open_blocks([seqs[i] for i in edge.tolist()], pos[edge].tolist())
        n = len(b)
        self._batch = b
        self.num_steady_steps += 1
        return SchedulerOutput(_DecodeRows(b.seqs), b.seqs, num_logit_rows=n, num_tokens=n, num_plain_decodes=n,
                               batch=b)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Running sequences go first, oldest first, each taking what it has left to compute within the
        budget; when the pool is short the newest are preempted until this one fits. This is the
        scheduler's one pass over the batch each step: a plain decode inside its last block costs a
        few attribute reads and no call."""
        running, blocks, scheduled, seqs = self.running, self.blocks, out.scheduled, out.seqs
        try_append, bs = blocks.try_append, blocks.block_size
        max_len = self.config.max_model_len or sys.maxsize
        rows, tokens, plain = out.num_logit_rows, out.num_tokens, out.num_plain_decodes  # (locals: per sequence)
        # (Preempting removes sequences from the end of `running`, behind this one: iterating it stays valid.)
        for seq in running:
            if budget <= 0:
                break
            num_tokens = len(seq.token_ids)
            start = seq.num_computed_tokens
            n = num_tokens - start
            if n > budget:
                n = budget
            if n <= 0 or (seq.num_pending and (num_tokens >= seq.max_num_tokens or num_tokens >= max_len)):
                # (Its token in flight is its last by length: computing one more would only be thrown away.)
                continue
            own = seq.request.plain
            if n == 1 and own and start % bs:
                # A plain sequence's partly filled block is its own (only forks share one) and holds
                # this position: nothing to allocate or copy (BlockManager.try_append would say []).
                copies = None
            else:
                copies = try_append(seq, n)
                if copies is None:
                    copies = self._make_room(seq, n, out)
                    if copies is None:
                        break  # it preempted itself: everything after it is gone too
            if copies:
                out.block_copies += copies
            budget -= n
            if start + n == num_tokens and start >= seq.num_prompt_tokens:  # a decode: _place, inlined
                scheduled.append(ScheduledSeq(seq, n, _NO_ROWS, rows))
                seqs.append(seq)
                rows += 1
                tokens += n
                if n == 1 and own:
                    plain += 1
            else:
                out.num_logit_rows, out.num_tokens = rows, tokens
                self._place(out, seq, n)
                rows, tokens = out.num_logit_rows, out.num_tokens
        out.num_logit_rows, out.num_tokens, out.num_plain_decodes = rows, tokens, plain
        return budget

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> list[tuple[int, int]] | None:
        """Preempt from the back of `running` until `seq` can append n tokens, then append them (its
        copy-on-write pairs); None if `seq` had to preempt itself."""
        while not self.blocks.can_append(seq, n):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return None
        return self.blocks.append(seq, n)

    @staticmethod
    def _place(out: SchedulerOutput, seq: Sequence, n: int) -> None:
        """Add `seq`'s n tokens to the step, with the one rule for logits rows, in scheduled order: every
        prompt position of a chunk whose prompt_logprobs were asked (its last row also samples if the
        chunk catches up), else one row for a sequence this step catches up."""
        start, row = seq.num_computed_tokens, out.num_logit_rows
        caught_up = start + n == len(seq.token_ids)
        if start < seq.num_prompt_tokens and seq.params.prompt_logprobs is not None:
            out.scheduled.append(ScheduledSeq(seq, n, range(row, row + n), row + n - 1 if caught_up else None))
            out.num_logit_rows = row + n
        elif caught_up:
            out.scheduled.append(ScheduledSeq(seq, n, sample_row=row))
            out.num_logit_rows = row + 1
        else:
            out.scheduled.append(ScheduledSeq(seq, n))
        out.seqs.append(seq)
        out.num_tokens += n

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        """Admit waiting sequences in order while blocks, budget and max_num_seqs allow."""
        while (self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            if seq.num_pending:  # preempted while its token was in flight: it waits for that token
                break
            cached = [] if seq.params.prompt_logprobs is not None else \
                self.blocks.find_cached_prefix(seq, self.namespace)
            n = min(seq.num_tokens - len(cached) * self.blocks.block_size, budget)
            if not self.blocks.can_allocate(seq, n, cached):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, n, cached, self.namespace)
            if seq.num_preemptions == 0:  # prompt tokens served from the cache; a recompute keeps it
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self._place(out, seq, n)
            budget -= n
        return budget

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute later: drop the blocks, keep the tokens (generated ones become prompt-like)."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

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
