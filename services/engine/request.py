"""What the engine tracks per request and per sequence, in tokens (text is the output processor's). No torch here."""

from __future__ import annotations

import enum
import itertools
import sys
import time
from dataclasses import dataclass, field

from services.common.sampling_params import SamplingParams


@dataclass
class SampledToken:
    """One token the sampler picked for a sequence."""

    token_id: int
    logprob: float
    """Raw log-probability of the token."""
    top: tuple[list[int], list[float], int] | None = None
    """When logprobs were asked: (top ids, their logprobs, rank of the sampled token)."""

_seq_ids = itertools.count()

PENDING = -1
"""Placeholder in `Sequence.token_ids` for a token sampled on the device and not yet read back."""


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generated continuation. `num_computed_tokens` catches up with `len(token_ids)` under the
    step's token budget: a long prompt takes several steps (chunked prefill), a decode one token."""

    request: "Request"
    index: int
    """Position among the request's n samples (or beams)."""
    token_ids: list[int]
    num_prompt_tokens: int
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    cumulative_logprob: float = 0.0
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: int | None = None
    """The stop token id that ended the sequence, if one did."""
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    num_emitted_tokens: int = 0
    """Output tokens already sent out in a delta (the next delta starts after them)."""
    finish_emitted: bool = False
    """The finish reason went out (or the caller ended the sequence itself): nothing more to send."""
    num_pending: int = 0
    """Trailing entries of `token_ids` that are placeholders (PENDING) for tokens sampled by a step
    still in flight (asynchronous scheduling, docs/engine.md); 0 or 1 between steps."""
    pending_row: int = 0
    """While num_pending: the row of the in-flight step's sampled tokens that holds its token."""
    params: SamplingParams = field(init=False, repr=False)
    """The request's sampling parameters (read per step: an attribute, not a lookup through the request)."""
    max_num_tokens: int = field(init=False, repr=False)
    """Tokens (prompt included) at which max_tokens ends the sequence; sys.maxsize when it has none."""

    def __post_init__(self) -> None:
        self.params = p = self.request.params
        if self.logprobs is None and p.logprobs is not None:
            self.logprobs = []
        self.max_num_tokens = sys.maxsize if p.max_tokens is None else self.num_prompt_tokens + p.max_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_resolved_output_tokens(self) -> int:
        """Output tokens whose ids are known on the host (placeholders of a step in flight excluded)."""
        return len(self.token_ids) - self.num_pending - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list | None = None
    first_token_time: float | None = None
    first_scheduled_time: float | None = None
    aborted: bool = False
    prompt_logprobs_emitted: bool = False
    beam: object | None = None
    """The BeamSearch state (services/engine/beam_search.py) of a beam-search request, else None."""
    stream: bool = True
    """Emit a delta every step the request advances; False: one delta when it finishes, holding all
    of it (the offline API's requests without stop strings: no per-token work on the host)."""

    plain: bool = field(init=False, repr=False)
    """One sequence, no beams, no penalties: the step handles its rows on its fast path (the engine
    clears it when it attaches a beam search)."""

    def __post_init__(self) -> None:
        self.plain = self.params.n == 1 and not self.params.has_penalties and self.beam is None
        # Sampling forks the first sequence into n once the prompt is computed, so the prompt's
        # blocks are computed once and shared.
        self.seqs.append(Sequence(self, 0, list(self.prompt_token_ids), len(self.prompt_token_ids)))
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def needs_fork(self) -> bool:
        return len(self.seqs) < self.params.n

    @property
    def finished(self) -> bool:
        seqs = self.seqs
        if len(seqs) == 1:  # the common case, checked for each request that advances in a step
            return self.params.n == 1 and seqs[0].status is SeqStatus.FINISHED
        return not self.needs_fork and all(s.finished for s in seqs)
