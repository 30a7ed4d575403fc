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

Files: this one decides the step (the rule above, admission, preemption); what a step decided is
services/engine/scheduler_output.py; what happens once it ran (advance, resolve, stops, forks) is
services/engine/scheduler_updates.py.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass

import numpy as np

from services.common.errors import QueueFullError
from services.engine.block_manager import BlockManager
from services.engine.input_batch import DecodeBatch
from services.engine.request import Sequence, SeqStatus
from services.engine.scheduler_output import NO_ROWS, DecodeRows, ScheduledSeq, SchedulerOutput
from services.engine.scheduler_updates import StepUpdates

__all__ = ["QueueFullError", "ScheduledSeq", "Scheduler", "SchedulerConfig", "SchedulerOutput"]


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


class Scheduler(StepUpdates):
    """Decides each step (`schedule`); the bookkeeping once it ran is inherited from `StepUpdates`."""

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
        return SchedulerOutput(DecodeRows(b.seqs), b.seqs, num_logit_rows=n, num_tokens=n, num_plain_decodes=n,
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
                scheduled.append(ScheduledSeq(seq, n, NO_ROWS, rows))
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
