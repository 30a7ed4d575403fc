"""What one scheduling step decides (`SchedulerOutput`): its sequences, their token counts and logits rows.

Made by services/engine/scheduler.py, read by the model runner (which rows to compute) and the engine (which to
sample), and handed back to the scheduler with the sampled tokens (services/engine/scheduler_updates.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.engine.input_batch import DecodeBatch
from services.engine.request import Sequence

__all__ = ["NO_ROWS", "ScheduledSeq", "SchedulerOutput", "DecodeRows"]


NO_ROWS = range(0)


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    prompt_logprob_rows: range = NO_ROWS
    """Rows of the step's logits holding this chunk's prompt positions (when prompt_logprobs were asked)."""
    sample_row: int | None = None
    """The logits row that predicts the sequence's next token, when this step catches it up."""


class DecodeRows:
    """`SchedulerOutput.scheduled` of a steady decode step, made on demand: row i is `ScheduledSeq(seqs[i], 1,
    sample_row=i)` (the steady path builds no per-sequence object; only a step off the fast paths reads these)."""

    __slots__ = ("seqs",)

    def __init__(self, seqs: list[Sequence]):
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def __iter__(self):
        return (ScheduledSeq(seq, 1, NO_ROWS, i) for i, seq in enumerate(self.seqs))

    def __getitem__(self, i: int) -> ScheduledSeq:
        return ScheduledSeq(self.seqs[i], 1, NO_ROWS, range(len(self.seqs))[i])


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] | DecodeRows = field(default_factory=list)
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
