"""What the router's core needs from engines, tokenizers and the registry, as small interfaces.

`RouterCore` and `RequestStream` speak only these; services/router/grpc_clients.py implements them
over gRPC, and tests/unit/test_router_core.py over fakes (so retry and failover run on CPU without
processes). Messages here are domain objects: protobuf stays inside the gRPC implementations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import FolioError
from services.common.outputs import Logprob
from services.common.registry import EngineRecord
from services.common.sampling_params import SamplingParams


# --- engines ----------------------------------------------------------------------------------------
@dataclass
class EngineRequest:
    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class SequenceUpdate:
    """Sequence `index`'s tokens since the engine's previous message."""

    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None] | None = None
    finish_reason: str | None = None
    """None while generating; "stop", "length" or "abort" on the sequence's last update."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the sequence, if any."""


@dataclass
class EngineMessage:
    """One message of an engine's Generate stream."""

    sequences: list[SequenceUpdate]
    finished: bool = False
    cached_tokens: int = 0
    """Prompt tokens served from the engine's prefix cache (on the last message)."""
    queue_s: float | None = None
    """Time the request waited in the engine's queue (on the first and last messages)."""
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    """On the first message, when requested."""
    first_token_path: list[tuple[str, int]] | None = None
    """On the first message with tokens: the engine's hops of the first token, (hop, time.monotonic_ns()),
    then the router's "router.engine_msg" (read off the engine's stream). docs/router.md."""


class EngineFailed(Exception):
    """The engine call failed; `error` is the engine's status as a domain error (`error.status` names it)."""

    def __init__(self, error: FolioError):
        super().__init__(str(error))
        self.error = error


class EngineCall(Protocol):
    def messages(self) -> AsyncIterator[EngineMessage]:
        """The engine's messages, in order; raises EngineFailed when the call fails."""

    def cancel(self) -> None:
        """End the call (no-op once it finished); the engine aborts the request and frees its blocks."""

    def fail(self, error: FolioError) -> None:
        """End the call as failed with `error` (the engine hung): `messages()` raises EngineFailed(error)."""


class EngineClient(Protocol):
    def generate(self, address: str, request: EngineRequest, timeout_s: float | None) -> EngineCall: ...

    async def close(self) -> None: ...


# --- tokenizers -------------------------------------------------------------------------------------
class Detokenizer(Protocol):
    """One sequence's incremental detokenization (never splits a multi-byte character)."""

    def open_early(self) -> None:
        """Start setting up now, off the time-to-first-token path."""

    async def add(self, token_ids: list[int], flush: bool) -> str:
        """Text completed by these tokens; `flush` at the end of the sequence releases what is held."""

    async def finish(self) -> None:
        """End cleanly after the last `add`."""

    def close(self) -> None:
        """End at once (the request failed or was cancelled)."""


class TokenizerClient(Protocol):
    address: str
    model: str
    """The model this tokenizer serves (known after `start`)."""

    async def start(self, wait_s: float) -> None: ...

    async def encode(self, *, text: str | None = None, messages: list[dict] | None = None, tools: list[dict] | None = None,
                     add_special_tokens: bool = True, add_generation_prompt: bool = True,
                     timeout_s: float | None = None) -> list[int]: ...

    async def decode(self, token_ids: list[int], skip_special_tokens: bool) -> str: ...

    def detokenizer(self, skip_special_tokens: bool) -> Detokenizer: ...

    async def close(self) -> None: ...


# --- the registry -----------------------------------------------------------------------------------
class EngineChoice(Protocol):
    engine_id: str
    address: str


class Registry(Protocol):
    """The router's view of the engines (services/router/registry_client.py over Redis)."""

    view: list[EngineRecord]
    redis_ok: bool

    async def refresh(self) -> None: ...

    def start(self) -> None: ...

    async def close(self) -> None: ...

    def models(self) -> dict[str, list[EngineRecord]]: ...

    async def choose(self, model: str, request_id: str, blocks: int,
                     exclude: set[str] = frozenset()) -> EngineChoice | None: ...

    def predict(self, model: str, exclude: set[str] = frozenset()) -> EngineChoice | None:
        """The engine `choose` must return, from what is known locally (no I/O, no reservation): when only
        one qualifies; else None. Only a head start: `choose` decides."""

    async def release(self, engine_id: str, request_id: str) -> None: ...

    def mark_suspect(self, engine_id: str) -> None: ...
