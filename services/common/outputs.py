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
    """"stop" (EOS, a stop string or token), "length" (max_tokens or context) or "abort"."""
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
