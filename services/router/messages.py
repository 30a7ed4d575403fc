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


@dataclass
class ModelInfo:
    id: str
    engines: int
    max_model_len: int
