"""What generation returns: per-token logprobs, one sequence's output, one request's output."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's log-probability, with its rank (1 = most likely) and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list  # list[dict[int, Logprob] | None], one entry per prompt token
SampleLogprobs = list  # list[dict[int, Logprob]], one entry per generated token


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    """"stop" (EOS, a stop string or token), "length" (max_tokens or context), "abort", or "error" (a
    structured-output grammar that allows no next token: docs/structured-output.md)."""
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended the sequence, if any."""

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass
class SequenceDelta:
    """What one sequence produced in one engine step: token ids, never text (text is the output
    processor's job, services/common/output_processor.py)."""

    index: int
    """Position among the request's n samples (or beams)."""
    token_ids: list[int]
    """Tokens generated since the previous delta."""
    logprobs: SampleLogprobs | None
    """One entry per token in token_ids (when requested); `decoded_token` is left for the output processor."""
    cumulative_logprob: float
    finish_reason: str | None = None
    """Set on the sequence's last delta: "stop" (EOS or a stop token id), "length", "abort" or "error"."""
    stop_token_id: int | None = None
    """The stop token id that ended the sequence, if one did (EOS is not a stop token id)."""


@dataclass
class RequestDelta:
    """One request's news from one engine step: the sequences that advanced or finished."""

    request_id: str
    sequences: list[SequenceDelta]
    finished: bool
    """True on the request's last delta (every sequence finished, or the request was aborted)."""
    prompt_logprobs: PromptLogprobs | None = None
    """Sent once, on the request's first delta with a sequence (when requested)."""
    num_cached_tokens: int = 0
    arrival_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    error: str | None = None
    """Bad input the engine could find only once the request was queued (its grammar did not compile
    against the vocabulary, or a resumed stream's tokens leave it): a message naming the field. Set on
    the request's only delta (finished, no sequences); the gRPC engine answers INVALID_ARGUMENT with it,
    the offline API raises ValueError."""
