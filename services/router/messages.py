"""The router's Python API vocabulary: `GenerateInput` in, `Chunk`s (of `ChoiceDelta`s, with `Usage`) out."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.outputs import Logprob
from services.common.sampling_params import SamplingParams


@dataclass
class GenerateInput:
    """One generation request. Give exactly one of `prompt`, `messages`, `prompt_token_ids`."""

    params: SamplingParams
    model: str | None = None
    """Served model name; None: the only model served."""
    prompt: str | None = None
    messages: list[dict] | None = None
    """Chat messages ({"role", "content"}), rendered with the model's chat template by the tokenizer."""
    tools: list[dict] | None = None
    """Chat only: tool definitions (OpenAI's shape) for the chat template."""
    prompt_token_ids: list[int] | None = None
    request_id: str | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    timeout_s: float | None = None
    """Deadline for the whole request (None: none); the engine call gets what is left of it."""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ChoiceDelta:
    """New output of sequence `index` since the previous chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None
    """One {token_id: Logprob} per new token (the sampled token first), when logprobs were requested."""
    finish_reason: str | None = None
    """None while generating; then "stop", "length" or "abort"."""
    stop_reason: str | int | None = None

    def extend(self, later: ChoiceDelta) -> None:
        """Append the same sequence's next delta (text, tokens, logprobs); its finish, if any, is the end."""
        self.text += later.text
        self.token_ids = self.token_ids + later.token_ids
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        if later.finish_reason is not None:
            self.finish_reason, self.stop_reason = later.finish_reason, later.stop_reason


@dataclass
class Chunk:
    request_id: str
    model: str
    choices: list[ChoiceDelta]
    finished: bool = False
    usage: Usage | None = None
    """On the last chunk."""
    engine_id: str | None = None
    """On the first chunk, and again after a failover."""
    prompt_token_ids: list[int] | None = None
    """On the first chunk."""
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    """On the first chunk, when params.prompt_logprobs was set: one entry per prompt token (the first is None)."""
    timing: dict = field(default_factory=dict)
    """On the last chunk: time_to_first_token_s, total_s, engine_queue_s."""

    def worth_sending(self) -> bool:
        """Whether the consumer learns anything from this chunk."""
        return bool(self.choices or self.finished or self.engine_id or self.prompt_token_ids)

    def extend(self, later: Chunk) -> None:
        """Fold the request's next chunk into this one (several ready at once go out as one): each
        sequence's deltas appended in order; what the first chunk carries kept; what the last one carries
        (finish, usage, timing) taken; the engine id the latest one named."""
        by_index = {c.index: c for c in self.choices}
        for c in later.choices:
            mine = by_index.get(c.index)
            if mine is None:
                by_index[c.index] = c
                self.choices.append(c)
            else:
                mine.extend(c)
        self.finished = self.finished or later.finished
        self.usage = later.usage or self.usage
        self.timing = later.timing or self.timing
        self.engine_id = later.engine_id or self.engine_id
        if self.prompt_token_ids is None:
            self.prompt_token_ids = later.prompt_token_ids
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs


@dataclass
class ModelInfo:
    id: str
    engines: int
    max_model_len: int
