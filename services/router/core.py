"""The router's domain core: `RouterCore.generate()` streams one request through tokenizer and engines.

This is the Python API the gRPC servicer (services/router/server.py) and the OpenAI-compatible HTTP
layer call; neither touches the registry, the engines or protobuf beyond converting at its edge.
`RouterCore` owns the collaborators (registry, engine client, one tokenizer client per model, all
behind the interfaces of services/router/clients.py) and the counters; each request is a
`RequestStream` (services/router/request_stream.py), which holds the request's state, retries,
fails over and assembles chunks. See docs/router.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, nullcontext

from services.common import telemetry
from services.common.errors import FolioError, InvalidArgument, NotFound, Unavailable, quote
from services.common.request_limits import RequestLimits
from services.router.batching import batched
from services.router.clients import EngineClient, Registry, TokenizerClient
from services.router.engine_watch import EngineWatch
from services.common.cpu_latency import CpuWakeLatency
from services.common.keep_awake import KeepAwake
from services.router.messages import ChoiceDelta, Chunk, GenerateInput, ModelInfo, Usage
from services.router.request_stream import RequestStream, Route, RouterStats, encode_prompt

log = logging.getLogger("folio.router")


class RouterCore:
    """Routing and streaming, independent of the transport. Create, `await start()`, use, `await close()`."""

    def __init__(self, registry: Registry, engines: EngineClient, tokenizers: list[TokenizerClient],
                 max_attempts: int = 3, limits: RequestLimits | None = None, watch: EngineWatch | None = None,
                 keep_awake: KeepAwake | None = None, wake_latency: CpuWakeLatency | None = None):
        """`keep_awake`: the event loop polls instead of sleeping while requests are in flight; `wake_latency`:
        the host's CPUs poll instead of halting meanwhile (services/common/cpu_latency.py)."""
        self.registry = registry
        self.keep_awake = keep_awake
        self.wake_latency = wake_latency
        self.watch = watch or EngineWatch(registry)
        self.limits = limits or RequestLimits()
        self.engines = engines
        self.tokenizers = tokenizers
        self.by_model: dict[str, TokenizerClient] = {}
        self.max_attempts = max_attempts
        self.counters = RouterStats()

    @classmethod
    def over_grpc(cls, redis, tokenizer_addresses: list[str], stale_ms: int = 1500, reservation_ttl_ms: int = 10_000,
                  suspect_s: float = 2.0, max_attempts: int = 3, limits: RequestLimits | None = None,
                  hung_after_s: float = 4.0, first_step_s: float = 120.0, detokenize: str = "local",
                  engine_calls_ahead: bool = True, busy_loop: bool = False, engine_fast_lane: bool = True,
                  wake_latency: CpuWakeLatency | None = None) -> RouterCore:
        """The router's core over Redis (the registry) and gRPC (engines, tokenizer services)."""
        from services.router.grpc_clients import GrpcEngineClient, GrpcTokenizerClient
        from services.router.registry_client import RegistryClient

        registry = RegistryClient(redis, stale_ms, reservation_ttl_ms, suspect_s)
        tokenizers = [GrpcTokenizerClient(a, detokenize) for a in tokenizer_addresses]
        return cls(registry, GrpcEngineClient(ahead=engine_calls_ahead, fast_lane=engine_fast_lane), tokenizers, max_attempts, limits,
                   EngineWatch(registry, hung_after_s, first_step_s), KeepAwake() if busy_loop else None, wake_latency)

    async def start(self, tokenizer_wait_s: float = 60.0) -> None:
        await self.registry.refresh()
        self.registry.start()
        self.watch.start()
        for t in self.tokenizers:
            await t.start(tokenizer_wait_s)
            self.by_model[t.model] = t
            log.info("tokenizer %s serves %s", t.address, t.model)

    async def close(self) -> None:
        if self.keep_awake is not None:
            self.keep_awake.close()
        if self.wake_latency is not None:
            self.wake_latency.close()
        await self.watch.close()
        await self.registry.close()
        for t in self.tokenizers:
            await t.close()
        await self.engines.close()

    # --- models -----------------------------------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        """Models with at least one live engine (as of the registry view, refreshed twice a second)."""
        return [ModelInfo(m, len(es), max(e.max_model_len for e in es)) for m, es in sorted(self.registry.models().items())]

    def can_route(self) -> bool:
        """Whether a request could be routed now: every model a tokenizer serves (or, with no tokenizer,
        some model) has a live engine in the registry view."""
        live = self.registry.models()
        wanted = set(self.by_model) or set(live)
        return bool(wanted) and all(live.get(m) for m in wanted)

    def _known_models(self) -> set[str]:
        return set(self.by_model) | set(self.registry.models())

    def resolve_model(self, model: str | None) -> str:
        if model and model in self.by_model:  # served by a tokenizer: known (asked twice on a first token's way)
            return model
        known = self._known_models()
        if not model:
            if len(known) == 1:
                return next(iter(known))
            if not known:
                raise Unavailable("no model is being served yet")
            raise InvalidArgument(f"model: required when several models are served ({', '.join(sorted(known))})")
        if model not in known:
            raise NotFound(f"model: {quote(model)} is not served here (served: {', '.join(sorted(known)) or 'none'})")
        return model

    def max_model_len(self, model: str) -> int | None:
        """The context limit of the model's live engines (None: no live engine). (Asked twice per request on
        the first token's way: one model's engines, not every model's card.)"""
        engines = self.registry.models().get(model)
        return max(e.max_model_len for e in engines) if engines else None

    def check_context(self, model: str, prompt_len: int, max_tokens: int | None, what: str = "prompt") -> None:
        """The prompt (and prompt + max_tokens) against the model's context limit, worded as vLLM does."""
        limit = self.max_model_len(model)
        if limit is None:
            raise Unavailable(f"no live engine serves {model!r}")
        if prompt_len >= limit:
            raise InvalidArgument(f"{what}: This model's maximum context length is {limit} tokens. However, your "
                                  f"request has {prompt_len} input tokens. Please reduce the length of the input.")
        if max_tokens is not None and prompt_len + max_tokens > limit:
            raise InvalidArgument(f"max_tokens: This model's maximum context length is {limit} tokens. However, you "
                                  f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {what}, "
                                  f"{max_tokens} in the completion). Please reduce the length of the {what} or "
                                  "completion.")

    def check_limits(self, inp: GenerateInput, model: str) -> None:
        """The request's sizes against `limits` (services/common/request_limits.py), before any work is done."""
        lim = self.limits
        lim.check_params(inp.params)
        lim.check_choices(inp.params.n, 1)
        lim.check_count("messages", inp.messages, "max_messages")
        limit = self.max_model_len(model)
        lim.check_max_tokens(inp.params.max_tokens, limit)
        if inp.prompt_token_ids is not None and limit is not None:  # (no live engine: choosing one says so)
            self.check_context(model, len(inp.prompt_token_ids), inp.params.max_tokens, "prompt_token_ids")

    # --- tokens and text --------------------------------------------------------------------------
    async def encode(self, inp: GenerateInput, timeout_s: float | None = None) -> tuple[str, list[int]]:
        """Resolve the model and tokenize the input (prompt, messages or ids) as `generate` would; lets a caller
        check the prompt against the context limit first and then generate from `prompt_token_ids`."""
        model = self.resolve_model(inp.model)
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        return model, await encode_prompt(self.by_model.get(model), inp, model, deadline)

    async def decode(self, model: str, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        tok = self.by_model.get(model)
        if tok is None:
            raise Unavailable(f"model: no tokenizer service for {quote(model)}")
        return await tok.decode(token_ids, skip_special_tokens)

    def stats(self) -> dict:
        c = self.counters
        return {"redis_ok": self.registry.redis_ok, "engines": list(self.registry.view), "in_flight": c.in_flight,
                "retries": c.retries, "failovers": c.failovers, "requests_total": c.requests_total,
                "calls_ahead": c.calls_ahead, "calls_moved": c.calls_moved}

    # --- generation -------------------------------------------------------------------------------
    async def generate(self, inp: GenerateInput) -> AsyncIterator[Chunk]:
        """Stream one request's output. Raises FolioError subclasses (InvalidArgument naming the field,
        NotFound, ResourceExhausted, Unavailable, DeadlineExceeded) before or during the stream. Chunks
        that are ready together come as one (services/router/batching.py)."""
        deadline = time.monotonic() + inp.timeout_s if inp.timeout_s is not None else None
        self.counters.in_flight += 1
        awake = self.keep_awake.hold() if self.keep_awake is not None else nullcontext()
        woken = self.wake_latency.hold() if self.wake_latency is not None else nullcontext()
        try:
            with awake, woken:
                model = self.resolve_model(inp.model)
                self.check_limits(inp, model)
                route = Route(self.registry, self.engines, self.by_model.get(model), self.counters,
                              self.max_attempts, self.watch)
                stream = RequestStream(route, inp, model, deadline).run()
                async with aclosing(batched(stream, first_inline=not telemetry.enabled())) as chunks:
                    async for chunk in chunks:
                        yield chunk
        finally:
            self.counters.in_flight -= 1
            self.counters.requests_total += 1


__all__ = ["RouterCore", "GenerateInput", "Chunk", "ChoiceDelta", "Usage", "ModelInfo", "FolioError"]
