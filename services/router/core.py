"""The router's domain core: `RouterCore.generate()` streams one request through tokenizer and engines.

This is the Python API the gRPC servicer (services/router/server.py) and the OpenAI-compatible HTTP
layer call; neither touches the registry, the engines or protobuf beyond converting at its edge.
See docs/router.md.

One request: resolve the model -> encode (tokenizer service) -> choose-and-reserve an engine
(Redis) -> stream token ids from the engine -> detokenize each sequence through the tokenizer's
bidirectional stream -> apply stop strings -> yield `Chunk`s. An engine that fails before the first
token is replaced by another (up to `max_attempts`); one that fails after tokens were streamed is
replaced too when n == 1: the prompt plus the tokens generated so far go to another engine and the
same stream continues, with no token lost or repeated. Cancelling the consumer cancels the engine
call, which aborts the request there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from protos.gen.folio.v1 import common_pb2, engine_pb2, engine_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from services.common import telemetry
from services.common.convert import FINISH_FROM_PB, params_to_pb, position_from_pb
from services.common.errors import (
    DeadlineExceeded, FolioError, InvalidArgument, NotFound, ResourceExhausted, Unavailable,
)
from services.common.grpc_errors import from_rpc_error
from services.common.server import channel
from services.common.sampling_params import SamplingParams
from services.common.outputs import Logprob
from services.router.registry_client import RegistryClient

log = logging.getLogger("folio.router")

# Engine errors that mean "try another engine" (before the first token, or with failover after).
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
              grpc.StatusCode.UNKNOWN}


@dataclass
class GenerateInput:
    """One generation request. Give exactly one of `prompt`, `messages`, `prompt_token_ids`."""

    params: SamplingParams
    model: str | None = None
    """Served model name; None: the only model served."""
    prompt: str | None = None
    messages: list[dict] | None = None
    """Chat messages ({"role", "content"}), rendered with the model's chat template by the tokenizer."""
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
    """On the last chunk: queue_s, time_to_first_token_s, total_s."""


@dataclass
class ModelInfo:
    id: str
    engines: int
    max_model_len: int


class _TokenizerClient:
    def __init__(self, address: str):
        self.address = address
        self.channel = channel(address)
        self.stub = tokenizer_pb2_grpc.TokenizerStub(self.channel)
        self.info: tokenizer_pb2.TokenizerInfoResponse | None = None


class _SeqDetok:
    """One sequence's text: incremental detokenization over the tokenizer's stream, with stop strings."""

    def __init__(self, stub, model: str, params: SamplingParams):
        self.call = stub.Detokenize()
        self.params = params
        self.text = ""
        self.sent = 0
        self.first = True
        self.model = model
        self._opening: asyncio.Future | None = None

    def open_early(self) -> None:
        """Set the stream up now, while the engine is being chosen and called, rather than on the first
        token: a first message with no ids (answered with empty text) takes the set-up off the TTFT path."""
        self._opening = asyncio.ensure_future(self._send([], flush=False))

    async def add(self, ids: list[int], flush: bool) -> str:
        if self._opening is not None:
            opening, self._opening = self._opening, None
            await opening
        return await self._send(ids, flush)

    async def _send(self, ids: list[int], flush: bool) -> str:
        req = tokenizer_pb2.DetokenizeRequest(token_ids=ids, flush=flush)
        if self.first:
            req.model = self.model
            req.skip_special_tokens = self.params.skip_special_tokens
            self.first = False
        await self.call.write(req)
        resp = await self.call.read()
        if resp is grpc.aio.EOF:
            raise Unavailable("tokenizer: detokenize stream ended")
        return resp.text

    def take(self, done: bool) -> str:
        """Text ready to send: everything when done, else all but what could still start a stop string."""
        hold = 0 if done else max(0, self.params.max_stop_len - 1)
        end = max(self.sent, len(self.text) - hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out

    async def finish(self) -> None:
        """End the stream cleanly (half-close, read to the end)."""
        try:
            if self._opening is not None:
                opening, self._opening = self._opening, None
                await opening
            await self.call.done_writing()
            while await self.call.read() is not grpc.aio.EOF:
                pass
        except (grpc.aio.AioRpcError, asyncio.CancelledError, Unavailable):
            self.call.cancel()

    def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
        self.call.cancel()


class _EngineFailed(Exception):
    def __init__(self, err: grpc.aio.AioRpcError):
        super().__init__(err.details())
        self.err = err


class RouterCore:
    """Routing and streaming, independent of the transport. Create, `await start()`, use, `await close()`."""

    def __init__(self, redis, tokenizer_addresses: list[str], stale_ms: int = 1500, reservation_ttl_ms: int = 10_000,
                 suspect_s: float = 2.0, max_attempts: int = 3):
        self.registry = RegistryClient(redis, stale_ms, reservation_ttl_ms, suspect_s)
        self.redis = redis
        self.tokenizers = [_TokenizerClient(a) for a in tokenizer_addresses]
        self.by_model: dict[str, _TokenizerClient] = {}
        self.max_attempts = max_attempts
        self._engine_channels: dict[str, tuple[grpc.aio.Channel, engine_pb2_grpc.EngineStub]] = {}
        self.in_flight = 0
        self.retries = 0
        self.failovers = 0
        self.requests_total = 0

    async def start(self, tokenizer_wait_s: float = 60.0) -> None:
        await self.registry.refresh()
        self.registry.start()
        for t in self.tokenizers:
            t.info = await t.stub.Info(tokenizer_pb2.TokenizerInfoRequest(), wait_for_ready=True,
                                       timeout=tokenizer_wait_s)
            self.by_model[t.info.model] = t
            log.info("tokenizer %s serves %s", t.address, t.info.model)

    async def close(self) -> None:
        await self.registry.close()
        for t in self.tokenizers:
            await t.channel.close()
        for ch, _ in self._engine_channels.values():
            await ch.close()

    # --- models -----------------------------------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        """Models with at least one live engine (as of the registry view, refreshed twice a second)."""
        return [ModelInfo(m, len(es), max(e.max_model_len for e in es)) for m, es in sorted(self.registry.models().items())]

    def _known_models(self) -> set[str]:
        return set(self.by_model) | set(self.registry.models())

    def resolve_model(self, model: str | None) -> str:
        known = self._known_models()
        if not model:
            if len(known) == 1:
                return next(iter(known))
            if not known:
                raise Unavailable("no model is being served yet")
            raise InvalidArgument(f"model: required when several models are served ({', '.join(sorted(known))})")
        if model not in known:
            raise NotFound(f"model: {model!r} is not served here (served: {', '.join(sorted(known)) or 'none'})")
        return model

    def max_model_len(self, model: str) -> int | None:
        """The context limit of the model's live engines (None: no live engine)."""
        return next((m.max_model_len for m in self.list_models() if m.id == model), None)

    async def encode(self, inp: GenerateInput, timeout_s: float | None = None) -> tuple[str, list[int]]:
        """Resolve the model and tokenize the input (prompt, messages or ids) as `generate` would; lets a caller
        check the prompt against the context limit first and then generate from `prompt_token_ids`."""
        model = self.resolve_model(inp.model)
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        return model, await self._encode(inp, model, deadline)

    async def decode(self, model: str, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        tok = self.by_model.get(model)
        if tok is None:
            raise Unavailable(f"model: no tokenizer service for {model!r}")
        try:
            r = await tok.stub.Decode(tokenizer_pb2.DecodeRequest(model=model, token_ids=token_ids,
                                                                  skip_special_tokens=skip_special_tokens), timeout=30)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        return r.text

    def stats(self) -> dict:
        return {"redis_ok": self.registry.redis_ok, "engines": list(self.registry.view), "in_flight": self.in_flight,
                "retries": self.retries, "failovers": self.failovers, "requests_total": self.requests_total}

    # --- generation -------------------------------------------------------------------------------
    def _engine_stub(self, address: str) -> engine_pb2_grpc.EngineStub:
        if address not in self._engine_channels:
            ch = channel(address)
            self._engine_channels[address] = (ch, engine_pb2_grpc.EngineStub(ch))
        return self._engine_channels[address][1]

    async def _encode(self, inp: GenerateInput, model: str, deadline: float | None) -> list[int]:
        if inp.prompt_token_ids is not None:
            if not inp.prompt_token_ids:
                raise InvalidArgument("prompt_token_ids: must contain at least one token")
            return list(inp.prompt_token_ids)
        tok = self.by_model.get(model)
        if tok is None:
            raise Unavailable(f"model: no tokenizer service for {model!r}; give prompt_token_ids")
        req = tokenizer_pb2.EncodeRequest(model=model)
        if inp.messages is not None:
            req.chat.messages.extend(common_pb2.ChatMessage(role=m.get("role", ""), content=m.get("content", ""))
                                     for m in inp.messages)
            req.add_generation_prompt = inp.add_generation_prompt
        elif inp.prompt is not None:
            req.text = inp.prompt
            req.add_special_tokens = inp.add_special_tokens
        else:
            raise InvalidArgument("prompt: give a prompt, messages or prompt_token_ids")
        try:
            r = await tok.stub.Encode(req, timeout=_remaining(deadline))
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        if not r.token_ids:
            raise InvalidArgument("prompt: encodes to no tokens")
        return list(r.token_ids)

    async def generate(self, inp: GenerateInput) -> AsyncIterator[Chunk]:
        """Stream one request's output. Raises FolioError subclasses (InvalidArgument naming the field,
        NotFound, ResourceExhausted, Unavailable, DeadlineExceeded) before or during the stream."""
        deadline = time.monotonic() + inp.timeout_s if inp.timeout_s is not None else None
        self.in_flight += 1
        try:
            async for chunk in self._generate(inp, deadline):
                yield chunk
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        finally:
            self.in_flight -= 1
            self.requests_total += 1

    async def _generate(self, inp: GenerateInput, deadline: float | None) -> AsyncIterator[Chunk]:
        t0 = time.monotonic()
        model = self.resolve_model(inp.model)
        rid = inp.request_id or f"req-{uuid.uuid4().hex[:20]}"
        params = inp.params
        with telemetry.span("folio.router.generate", **{"folio.request_id": rid, "folio.model": model}) as span:
            prompt_ids = await self._encode(inp, model, deadline)
            if span.is_recording():
                span.set_attribute("folio.prompt_tokens", len(prompt_ids))
            tok = self.by_model.get(model)
            detoks: dict[int, _SeqDetok] = {}
            if tok is not None:
                detoks[0] = _SeqDetok(tok.stub, model, params)
                detoks[0].open_early()
            generated: list[int] = []  # sequence 0's tokens so far (for failover when n == 1)
            excluded: set[str] = set()
            failures: list[grpc.StatusCode] = []
            attempts = 0
            first_chunk = True
            finished_seqs: set[int] = set()
            completion_tokens = 0
            ttft = None
            engine_timing = None
            completed = False
            try:
                while True:
                    attempts += 1
                    choice = await self.registry.choose(model, rid, self._blocks_needed(model, prompt_ids, generated),
                                                        excluded)
                    if choice is None:
                        if excluded and failures and all(c == grpc.StatusCode.RESOURCE_EXHAUSTED for c in failures):
                            raise ResourceExhausted(f"the waiting queue of every engine serving {model!r} is full; "
                                                    "retry later")
                        if excluded:
                            raise Unavailable(f"no other live engine serves {model!r} (tried {len(excluded)})")
                        raise Unavailable(f"no live engine serves {model!r}")
                    req = engine_pb2.EngineGenerateRequest(request_id=rid, model=model, prompt_token_ids=prompt_ids + generated,
                                                           params=params_to_pb(self._resume_params(params, generated)))
                    call = self._engine_stub(choice.address).Generate(req, timeout=_remaining(deadline))
                    announced = False
                    try:
                        async for msg in _read_engine(call):
                            chunk = Chunk(request_id=rid, model=model, choices=[])
                            if not announced:
                                chunk.engine_id = choice.engine_id
                                announced = True
                            if first_chunk:
                                chunk.prompt_token_ids = list(prompt_ids)
                                if msg.prompt_logprobs:
                                    chunk.prompt_logprobs = [position_from_pb(p) for p in msg.prompt_logprobs]
                            for d in msg.sequences:
                                if d.index in finished_seqs:
                                    continue
                                det = detoks.get(d.index)
                                if det is None:
                                    if tok is None:
                                        raise Unavailable(f"model: no tokenizer service for {model!r}")
                                    det = detoks[d.index] = _SeqDetok(tok.stub, model, params)
                                reason = FINISH_FROM_PB[d.finish_reason]
                                stop = d.stop_str or (d.stop_token_id if d.HasField("stop_token_id") else None)
                                ids = list(d.token_ids)
                                delta = await det.add(ids, flush=reason is not None and not d.stop_str)
                                det.text += delta
                                if params.stop and delta and reason != "abort":
                                    hit = params.find_stop(det.text, len(delta))
                                    if hit is not None:  # the engine finds the same stop at the same token
                                        i, s = hit
                                        det.text = det.text[:i + len(s)] if params.include_stop_str_in_output else det.text[:i]
                                        reason, stop = "stop", s
                                if reason is not None:
                                    finished_seqs.add(d.index)
                                if d.index == 0:
                                    generated.extend(ids)
                                completion_tokens += len(ids)
                                lps = [position_from_pb(p) for p in d.logprobs] if params.logprobs is not None else None
                                chunk.choices.append(ChoiceDelta(d.index, det.take(reason is not None), ids, lps,
                                                                 reason, stop))
                            if ttft is None and any(c.token_ids for c in chunk.choices):
                                ttft = time.monotonic() - t0
                            if msg.HasField("timing") and engine_timing is None:
                                engine_timing = msg.timing
                            if msg.finished or len(finished_seqs) >= params.n:
                                chunk.finished = True
                                chunk.usage = Usage(len(prompt_ids), completion_tokens, msg.usage.cached_tokens)
                                chunk.timing = {"time_to_first_token_s": ttft, "total_s": time.monotonic() - t0,
                                                "engine_queue_s": (engine_timing.queue_ns / 1e9) if engine_timing else None}
                            if chunk.choices or chunk.finished or chunk.engine_id or chunk.prompt_token_ids:
                                first_chunk = False
                                yield chunk
                            if chunk.finished:
                                completed = True
                                if not msg.finished:
                                    break  # the router saw a stop string first: the finally aborts the engine side
                                # else read on: the engine's stream ends now, and ending it cleanly closes its span
                        if not completed:
                            raise Unavailable(f"engine {choice.engine_id} ended the stream early")
                        if span.is_recording():
                            span.set_attributes({"folio.output_tokens": completion_tokens,
                                                 "folio.engine_id": choice.engine_id,
                                                 "folio.time_to_first_token_ms": (ttft or 0) * 1000,
                                                 "folio.attempts": attempts})
                        return
                    except _EngineFailed as f:
                        code = f.err.code()
                        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                            raise DeadlineExceeded("deadline exceeded") from None
                        if code not in _RETRYABLE:
                            raise from_rpc_error(f.err) from None
                        excluded.add(choice.engine_id)
                        failures.append(code)
                        if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                            self.registry.mark_suspect(choice.engine_id)
                        if not generated and completion_tokens == 0:
                            await self.registry.release(choice.engine_id, rid)
                            self.retries += 1
                            log.warning("%s: engine %s failed before the first token (%s: %s); retrying elsewhere",
                                        rid, choice.engine_id, code.name, f.err.details())
                        elif params.n == 1 and params.prompt_logprobs is None:
                            self.failovers += 1
                            log.warning("%s: engine %s failed after %d tokens (%s); continuing on another engine",
                                        rid, choice.engine_id, len(generated), code.name)
                        else:
                            raise Unavailable(f"engine {choice.engine_id} failed mid-stream ({code.name}) and "
                                              f"a request with n={params.n} cannot be resumed elsewhere") from None
                        if attempts >= self.max_attempts:
                            raise from_rpc_error(f.err) from None
                    finally:
                        call.cancel()  # no-op when finished; aborts the engine request otherwise
            finally:
                for det in detoks.values():
                    if completed:
                        await det.finish()
                    else:
                        det.close()

    def _blocks_needed(self, model: str, prompt: list[int], generated: list[int]) -> int:
        bs = next((e.block_size for e in self.registry.view if e.model == model), 16)
        return -(-(len(prompt) + len(generated) + 1) // bs)

    @staticmethod
    def _resume_params(params: SamplingParams, generated: list[int]) -> SamplingParams:
        """Params for continuing after `generated` tokens on another engine (the same request otherwise)."""
        if not generated:
            return params
        return dataclasses.replace(
            params, max_tokens=None if params.max_tokens is None else params.max_tokens - len(generated),
            min_tokens=max(0, params.min_tokens - len(generated)))


async def _read_engine(call) -> AsyncIterator[engine_pb2.EngineGenerateResponse]:
    try:
        async for msg in call:
            yield msg
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED and call.cancelled():
            raise
        raise _EngineFailed(e) from None


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("deadline exceeded")
    return left


__all__ = ["RouterCore", "GenerateInput", "Chunk", "ChoiceDelta", "Usage", "ModelInfo", "FolioError"]
