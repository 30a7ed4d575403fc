"""The steady decode batch: per-row arrays of a step of plain decodes, carried to the next such step by delta.

vLLM V1's InputBatch idea, for Folio's steady state. When a step decodes exactly the running sequences, in
order, one token each (`SchedulerOutput.plain_decode` over all of `Scheduler.running`), the next step will do
the same unless something changed the running set (an admission, a finish, a preemption, an abort, a fork).
So the step's per-row facts live in arrays owned by a `DecodeBatch`, and the next step's batch is derived
from them (`advanced`): the same sequences, table rows and length limits, every position one further. The
scheduler then needs one vectorised check instead of a pass over the sequences (`Scheduler._schedule_steady`),
and the model runner writes the inputs from these arrays (`ModelRunner.prepare`); only rows starting a new KV
block call into the block manager. Anything else makes the scheduler take its general pass, which builds a
new batch from scratch (`build`). `tests/test_input_batch.py` checks the carried arrays against `build`.
No torch here.
"""

from __future__ import annotations

import operator
import sys

import numpy as np

_params = operator.attrgetter("params")
_computed = operator.attrgetter("num_computed_tokens")
_limit = operator.attrgetter("max_num_tokens")


class DecodeBatch:
    """One step of plain decodes: row i is `seqs[i]`, which computes its token at `positions[i]`."""

    __slots__ = ("seqs", "table_rows", "positions", "limits", "params", "advanced", "lean")

    def __init__(self, seqs: list, table_rows: np.ndarray, positions: np.ndarray, limits: np.ndarray,
                 params: list):
        self.seqs = seqs
        """The step's sequences in row order (a list of its own: `Scheduler.running` changes under it)."""
        self.table_rows = table_rows
        """int64 [n]: each sequence's row of the block manager's table array (`BlockManager.rows`)."""
        self.positions = positions
        """int64 [n]: the position of the token each sequence computes this step (its num_computed_tokens)."""
        self.limits = limits
        """int64 [n]: tokens at which a sequence ends by length (max_tokens or the context, the smaller)."""
        self.params = params
        """The distinct SamplingParams objects of the rows (the sampler's per-batch checks read these)."""
        self.advanced = False
        """Set when the step is launched (Scheduler.advance*): each sequence then counts one more token."""
        self.lean = False
        """Known to hold no streaming request and none without its first token's time: resolving a step
        of it reports and stamps no request (Scheduler.resolve_steady learns it, and it carries on)."""

    @classmethod
    def build(cls, seqs: list, tables: dict, max_model_len: int | None) -> "DecodeBatch":
        """From scratch: one pass per array over `seqs` (`tables`: BlockManager.tables, seq_id -> BlockTable)."""
        n = len(seqs)
        rows = np.fromiter((tables[s.seq_id].row for s in seqs), np.int64, n)
        positions = np.fromiter(map(_computed, seqs), np.int64, n)
        limits = np.fromiter(map(_limit, seqs), np.int64, n)
        np.minimum(limits, max_model_len or sys.maxsize, out=limits)
        params = list({id(p): p for p in map(_params, seqs)}.values())
        return cls(list(seqs), rows, positions, limits, params)

    def advanced_batch(self) -> "DecodeBatch":
        """The next step's batch over the same sequences: each position one further (this step computed it)."""
        nxt = DecodeBatch(self.seqs, self.table_rows, self.positions + 1, self.limits, self.params)
        nxt.lean = self.lean
        return nxt

    def __len__(self) -> int:
        return len(self.seqs)

    def same_as(self, other: "DecodeBatch") -> bool:
        """The same rows with equal arrays (tests compare a carried batch with a rebuilt one)."""
        return (len(self.seqs) == len(other.seqs) and all(a is b for a, b in zip(self.seqs, other.seqs))
                and np.array_equal(self.table_rows, other.table_rows)
                and np.array_equal(self.positions, other.positions) and np.array_equal(self.limits, other.limits)
                and {id(p) for p in self.params} == {id(p) for p in other.params})
