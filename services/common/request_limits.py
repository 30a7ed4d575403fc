"""How big one request may be: `RequestLimits`, checked before any per-request state is built.

One place for every size limit a client's request meets (the router's HTTP and gRPC APIs both call
these checks before tokenizing, choosing an engine or allocating anything per choice), so that the
memory and time one request can cost are bounded by the limits, not by what the client sent. A
refusal is an InvalidArgument (HTTP 400 / INVALID_ARGUMENT) naming the field and the limit. Each field
is also a router flag (`--max-n 256`; its docstring is the flag's help).
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.common.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = 8 << 20
    """Largest HTTP request body in bytes (413 beyond it); gRPC messages are capped at 64 MiB by the server."""
    max_n: int = 128
    """Most sequences one request may ask for (`n`, and `best_of`)."""
    max_logprobs: int = 20
    """Most alternatives per position (`logprobs`, `top_logprobs`, `prompt_logprobs`); the engine supports
    at most 20."""
    max_stop: int = 16
    """Most stop strings per request."""
    max_stop_chars: int = 1024
    """Longest stop string, in characters."""
    max_stop_token_ids: int = 1024
    """Most stop token ids per request."""
    max_prompts: int = 256
    """Most prompts in one /v1/completions request (a list of strings or of token-id lists)."""
    max_choices: int = 1024
    """Most choices one request may produce in all (prompts x n)."""
    max_messages: int = 4096
    """Most chat messages per request."""
    max_content_parts: int = 1024
    """Most content parts in one chat message."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    # --- checks (each raises InvalidArgument naming the field and the limit) ------------------------
    @staticmethod
    def _at_most(field: str, value: int, limit: int, flag: str) -> None:
        if value > limit:
            raise InvalidArgument(f"{field}: {value} is more than this server allows ({limit}; "
                                  f"the router's --{flag.replace('_', '-')} raises it)")

    def check_count(self, field: str, items: Sized | None, limit_name: str) -> None:
        """`items` (a list from the request) has at most the limit named `limit_name` entries."""
        if items is not None:
            self._at_most(field, len(items), getattr(self, limit_name), limit_name)

    def check_n(self, n: object, field: str = "n") -> None:
        """Called on the raw value, before anything is built per sequence."""
        if isinstance(n, int) and not isinstance(n, bool):
            self._at_most(field, n, self.max_n, "max_n")

    def check_logprobs(self, value: object, field: str) -> None:
        if isinstance(value, int) and not isinstance(value, bool):
            self._at_most(field, value, self.max_logprobs, "max_logprobs")

    def check_stop(self, stop: object, field: str = "stop") -> None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            return
        self.check_count(field, stop, "max_stop")
        longest = max((len(s) for s in stop if isinstance(s, str)), default=0)
        if longest > self.max_stop_chars:
            raise InvalidArgument(f"{field}: a stop string of {longest} characters is longer than this server "
                                  f"allows ({self.max_stop_chars}; the router's --max-stop-chars raises it)")

    def check_params(self, p: SamplingParams, logprobs_field: str = "logprobs") -> None:
        """Every limit on sampling parameters (n, logprobs, stop strings and ids)."""
        self.check_n(p.n)
        self.check_n(p.best_of, "best_of")  # the beam width with use_beam_search (gRPC clients too)
        self.check_logprobs(p.logprobs, logprobs_field)
        self.check_logprobs(p.prompt_logprobs, "prompt_logprobs")
        self.check_stop(p.stop)
        self.check_count("stop_token_ids", p.stop_token_ids, "max_stop_token_ids")

    def check_choices(self, n: int, prompts: int) -> None:
        self.check_count("prompt", range(prompts), "max_prompts")
        if n * prompts > self.max_choices:
            raise InvalidArgument(f"n: {prompts} prompts x n={n} is {n * prompts} choices, more than this server "
                                  f"allows ({self.max_choices}; the router's --max-choices raises it)")

    @staticmethod
    def check_max_tokens(max_tokens: int | None, max_model_len: int | None, field: str = "max_tokens") -> None:
        """max_tokens alone must fit the context (checked before the prompt is tokenized)."""
        if max_tokens is not None and max_model_len is not None and max_tokens >= max_model_len:
            raise InvalidArgument(f"{field}: {max_tokens} leaves no room for a prompt in this model's maximum "
                                  f"context length of {max_model_len} tokens")
