"""Continuous batching: which sequences run in the next step and how many of their tokens.

One rule covers prefill, chunked prefill, prefix-cache hits and decode: every scheduled sequence
advances `num_computed_tokens` towards `len(token_ids)`, taking at most what is left of the step's
token budget. Running sequences go first (oldest first), so a decode is never starved by new
prompts; when blocks run out the newest running sequence is preempted (its blocks freed, to be
recomputed later). Waiting sequences are admitted in arrival order while blocks and budget allow.
No torch here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.common.errors import QueueFullError
from services.engine.block_manager import BlockManager
from services.engine.request import Sequence, SeqStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    """Most sequences in one step."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks plus decodes)."""
    max_waiting: int | None = None
    """Bound on waiting sequences; None means unbounded (the offline API)."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """Copy-on-write (src, dst) block pairs to run before the step's forward pass."""
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, cache_namespace: object = None):
        self.config = config
        self.blocks = block_manager
        self.namespace = cache_namespace
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_computed_prompt_tokens = 0

    # --- queue ------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if self.config.max_waiting is not None and len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} requests)")
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence, after: Sequence) -> None:
        """A forked sequence joins the running set next to its parent (it holds blocks already)."""
        seq.status = SeqStatus.RUNNING
        self.running.insert(self.running.index(after) + 1, seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child`, a copy of `parent`'s tokens, joins the queue right after it (beam search). A
        running parent shares its blocks (copy-on-write at the next append); a waiting (preempted)
        parent has none, and the child waits to be computed like it."""
        if parent.status is SeqStatus.RUNNING:
            child.num_computed_tokens = parent.num_computed_tokens
            self.blocks.fork(parent, child)
            self.add_running(child, after=parent)
        else:
            child.num_computed_tokens = 0
            child.status = SeqStatus.WAITING
            self.waiting.insert(self.waiting.index(parent) + 1, child)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and give its blocks back."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        self.blocks.free(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- the step ---------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if n <= 0:
                i += 1
                continue
            while not self.blocks.can_append(seq, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break  # it preempted itself: everything after it is gone too
            out.block_copies += self.blocks.append(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1

        # New work only when nothing had to be preempted: admitting it would just preempt again.
        if not out.preempted:
            budget = self._admit(out, budget)
        if not out.scheduled and not out.preempted and self.running and self.waiting:
            # Every running sequence is idle (beams waiting for a preempted sibling, see beam_search.py)
            # and nothing waiting fits: hand their blocks back so the queue, in order, can run.
            for seq in reversed(self.running):
                self._preempt(seq, out)
            self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        """Admit waiting sequences in order while blocks, budget and max_num_seqs allow."""
        while (self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
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
            out.scheduled.append(ScheduledSeq(seq, n))
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

    def after_step(self, out: SchedulerOutput) -> None:
        """Advance each scheduled sequence and publish its newly full blocks to the prefix cache."""
        for s in out.scheduled:
            seq = s.seq
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.num_computed_prompt_tokens += min(s.num_new_tokens, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += s.num_new_tokens
            self.blocks.mark_computed(seq, self.namespace)
