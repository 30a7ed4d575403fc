"""The router's engine and tokenizer clients over gRPC (the interfaces are in services/router/clients.py).

Protobuf and grpc stop here: engine messages become `EngineMessage`s, failed calls `EngineFailed`
carrying a domain error, the tokenizer's bidirectional Detokenize stream a `Detokenizer`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import grpc

from protos.gen.folio.v1 import common_pb2, engine_pb2, engine_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from services.common.convert import params_to_pb
from services.common import telemetry
from services.common.errors import DeadlineExceeded, FolioError, Unavailable
from services.common.grpc_errors import from_rpc_error
from services.common.server import channel
from services.common.tokenizer import Tokenizer
from services.common import eager
from services.router.clients import EngineFailed, EngineMessage, EngineRequest
from services.router.engine_messages import message_from_pb
from services.router.fast_lane_client import FastLaneCall, FastLanes
from services.router.local_detokenizer import LocalDetokenizer, load_local_tokenizer

log = logging.getLogger("folio.router")


# --- engines ---------------------------------------------------------------------------------------
REFILL_DELAY_S = 0.005
"""How long after a taken call's first message its replacement opens (GrpcEngineClient._fill_soon)."""


class GrpcEngineClient:
    """Engine calls, one channel per engine address (kept for the router's life).

    With `ahead` (the default; not while tracing, whose per-call spans must open inside the request's
    trace), a request is sent on a GenerateStream call opened ahead of it, `depth` kept ready per engine:
    a message on a call that is already up reaches the engine's handler in ~0.3 ms on the CPU machine,
    where opening a call for it takes ~0.9 ms (docs/router.md). A call taken is replaced a few ms after
    its first message came back (so the opening does not compete with that request's first token);
    with none ready (the first request, a burst, an engine that lacks GenerateStream) it is Generate.
    With `fast_lane` (and `ahead`), a request goes over a connection opened ahead to the engine's fast lane
    where the engine serves one (services/router/fast_lane_client.py), else as above."""

    def __init__(self, ahead: bool = True, depth: int = 2, fast_lane: bool = False):
        self.ahead = ahead
        self.depth = depth
        self.lanes = None
        if fast_lane and ahead:
            self.lanes = FastLanes(depth)
        self._channels: dict[str, tuple[grpc.aio.Channel, engine_pb2_grpc.EngineStub]] = {}
        self._opened: dict[str, list[_OpenedCall]] = {}
        self._plain: set[str] = set()
        """Engines that answered GenerateStream UNIMPLEMENTED (an older engine): Generate only."""
        self._closed = False

    def _stub(self, address: str) -> engine_pb2_grpc.EngineStub:
        if address not in self._channels:
            ch = channel(address)
            self._channels[address] = (ch, engine_pb2_grpc.EngineStub(ch))
        return self._channels[address][1]

    def generate(self, address: str, request: EngineRequest, timeout_s: float | None) -> GrpcEngineCall:
        req = engine_pb2.EngineGenerateRequest(request_id=request.request_id, model=request.model,
                                               prompt_token_ids=request.prompt_token_ids,
                                               params=params_to_pb(request.params))
        if self.ahead and address not in self._plain and not telemetry.enabled():
            if self.lanes is not None and (conn := self.lanes.take(address)) is not None:
                return FastLaneCall(conn, req, timeout_s, on_first=lambda: self.lanes.fill_soon(address),
                                       fallback=lambda s: GrpcEngineCall(self._stub(address).Generate(req, timeout=s)))
            held = self._held(address)
            opened = next((c for c in held if c.ready), None)
            if opened is not None:
                held.remove(opened)
                return GrpcEngineCall(opened.call, req, timeout_s, on_first=lambda: self._fill_soon(address))
            self._fill(address)  # for later requests (this one does not wait)
        return GrpcEngineCall(self._stub(address).Generate(req, timeout=timeout_s))

    def _held(self, address: str) -> list[_OpenedCall]:
        held = self._opened.setdefault(address, [])
        held[:] = [c for c in held if not c.call.done()]  # an engine that went away ended them
        return held

    def _fill_soon(self, address: str) -> None:
        """Replace a taken call a little after its first message: opening one is a few hundred us of
        this loop's and the engine's time, which right then would delay that first token on its way to
        the client (measured on the CPU machine: +0.1 ms to the router's write, +0.2-0.5 ms to the client)."""
        asyncio.get_running_loop().call_later(REFILL_DELAY_S, self._fill, address)

    def _fill(self, address: str) -> None:
        if address in self._plain or self._closed:
            return
        held = self._held(address)
        learn = (lambda md: self.lanes.learn(address, md)) if self.lanes is not None else None
        while len(held) < self.depth:
            held.append(_OpenedCall(self._stub(address), lambda: self._plain.add(address), learn))

    async def close(self) -> None:
        self._closed = True
        if self.lanes is not None:
            await self.lanes.close()
        for held in self._opened.values():
            for opened in held:
                opened.close()
        for ch, _ in self._channels.values():
            await ch.close()


class _OpenedCall:
    """A GenerateStream call opened ahead of its request; usable once the engine answered the opening."""

    def __init__(self, stub: engine_pb2_grpc.EngineStub, unimplemented, learn=None):
        self.call = stub.GenerateStream()
        self.ready = False
        self._task = asyncio.ensure_future(self._wait_ready(unimplemented, learn))

    async def _wait_ready(self, unimplemented, learn=None) -> None:
        """Ready once the engine answered the opening; then wait for the call's end, so an engine without
        GenerateStream is recognised however its UNIMPLEMENTED arrives: as trailers right after (empty)
        initial metadata, which can resolve before the call reads as done, or raised by the wait itself."""
        try:
            md = await self.call.initial_metadata()
            if learn is not None and md is not None:
                learn(tuple(md))  # (the engine's fast lane, if it serves one)
            if not self.call.done():
                self.ready = True
            code = await self.call.code()
        except asyncio.CancelledError:
            return
        except grpc.aio.AioRpcError as e:
            code = e.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            self.ready = False
            log.info("engine without GenerateStream: requests go to it by Generate")
            unimplemented()

    def usable(self) -> bool:
        return self.ready and not self.call.done()

    def close(self) -> None:
        self._task.cancel()
        self.call.cancel()


class GrpcEngineCall:
    """One request's engine call: Generate's, or an opened GenerateStream call to which `request` is
    written (then `timeout_s` is enforced here and, through `timeout_ms`, by the engine; `on_first` runs
    once the first message has been read, or the call ended without one)."""

    def __init__(self, call, request: engine_pb2.EngineGenerateRequest | None = None,
                 timeout_s: float | None = None, on_first=None):
        self._call = call
        self._failed: FolioError | None = None
        self._sending: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._on_first = on_first
        if request is not None:
            if timeout_s is not None:
                request.timeout_ms = max(1, int(timeout_s * 1000))
                self._timer = asyncio.get_running_loop().call_later(
                    timeout_s, self.fail, DeadlineExceeded("deadline exceeded"))
            self._sending = eager.start(self._send(request))  # the request goes out now (3.12+)

    async def _send(self, request: engine_pb2.EngineGenerateRequest) -> None:
        try:
            await self._call.write(request)
            await self._call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, asyncio.CancelledError):
            pass  # the call ended (we cancelled it, or the engine went away): its reader finds out

    def _first_done(self) -> None:
        on_first, self._on_first = self._on_first, None
        if on_first is not None:
            on_first()

    async def messages(self) -> AsyncIterator[EngineMessage]:
        got = False
        try:
            if self._sending is not None:
                await self._sending
            async for msg in self._call:
                yield message_from_pb(msg)
                if not got:
                    got = True
                    self._first_done()
        except grpc.aio.AioRpcError as e:
            if self._failed is not None:
                raise EngineFailed(self._failed) from None
            if e.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                raise from_rpc_error(e) from None  # we ended it: not the engine's failure
            if self._sending is not None and not got and e.code() == grpc.StatusCode.CANCELLED:
                raise EngineFailed(Unavailable("engine: the opened call ended before the request")) from None
            raise EngineFailed(from_rpc_error(e)) from None
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError in the reader when the call is cancelled; when `fail` did that
            # (and nobody is cancelling this task), it is the engine's failure.
            if self._failed is not None and not asyncio.current_task().cancelling():
                raise EngineFailed(self._failed) from None
            raise
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._first_done()
        if self._sending is not None and not got:  # a draining engine closed the opened call unused
            raise EngineFailed(Unavailable("engine: the opened call ended before the request"))

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._call.cancel()
        self._first_done()

    def fail(self, error: FolioError) -> None:
        if not self._call.done():
            self._failed = error
            self._call.cancel()


# --- tokenizers -------------------------------------------------------------------------------------
class GrpcTokenizerClient:
    """One tokenizer service (it serves one model). With `detokenize="local"` token ids become text in
    this process, over the service's own tokenizer files when they can be read here
    (services/router/local_detokenizer.py); else, and with "service", through the service."""

    def __init__(self, address: str, detokenize: str = "local"):
        self.address = address
        self.channel = channel(address)
        self.stub = tokenizer_pb2_grpc.TokenizerStub(self.channel)
        self.model = ""
        self.detokenize = detokenize
        self.local: Tokenizer | None = None
        """The service's tokenizer, loaded here: detokenizing needs no call to the service."""

    async def start(self, wait_s: float) -> None:
        info = await self.stub.Info(tokenizer_pb2.TokenizerInfoRequest(), wait_for_ready=True, timeout=wait_s)
        self.model = info.model
        if self.detokenize == "local":
            self.local, why = await asyncio.to_thread(load_local_tokenizer, info.model_path, info.tokenizer_sha256)
            if self.local is not None:
                log.info("detokenizing %s in this process (%s)", self.model, why)
            else:
                log.warning("detokenizing %s through the tokenizer service at %s, one round trip per engine "
                            "message: %s", self.model, self.address, why)

    async def encode(self, *, text: str | None = None, messages: list[dict] | None = None,
                     add_special_tokens: bool = True, add_generation_prompt: bool = True,
                     timeout_s: float | None = None, tools: list[dict] | None = None) -> list[int]:
        req = tokenizer_pb2.EncodeRequest(model=self.model)
        if messages is not None:
            req.chat.messages.extend(common_pb2.ChatMessage(
                role=m.get("role", ""), content=m.get("content", ""), tool_call_id=m.get("tool_call_id") or "",
                tool_calls_json=json.dumps(m["tool_calls"]) if m.get("tool_calls") else "") for m in messages)
            if tools:
                req.chat.tools_json = json.dumps(tools)
            req.add_generation_prompt = add_generation_prompt
        else:
            req.text = text
            req.add_special_tokens = add_special_tokens
        try:
            r = await self.stub.Encode(req, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        return list(r.token_ids)

    async def decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        if self.local is not None:
            self.local.check_ids(token_ids)
            return self.local.decode(list(token_ids), skip_special_tokens)
        try:
            r = await self.stub.Decode(tokenizer_pb2.DecodeRequest(model=self.model, token_ids=token_ids,
                                                                   skip_special_tokens=skip_special_tokens), timeout=30)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        return r.text

    def detokenizer(self, skip_special_tokens: bool) -> LocalDetokenizer | GrpcDetokenizer:
        if self.local is not None:
            return LocalDetokenizer(self.local, skip_special_tokens)
        return GrpcDetokenizer(self.stub, self.model, skip_special_tokens)

    async def close(self) -> None:
        await self.channel.close()


class GrpcDetokenizer:
    """One sequence's Detokenize stream: token ids in, completed text out."""

    def __init__(self, stub, model: str, skip_special_tokens: bool):
        self.call = stub.Detokenize()
        self.model = model
        self.skip_special_tokens = skip_special_tokens
        self.first = True
        self._opening: asyncio.Future | None = None

    def open_early(self) -> None:
        """A first message with no ids (answered with empty text) sets the stream up while the engine is
        being chosen and called, rather than on the first token."""
        self._opening = asyncio.ensure_future(self._send([], flush=False))

    async def add(self, token_ids: list[int], flush: bool) -> str:
        await self._opened()
        return await self._send(token_ids, flush)

    async def _opened(self) -> None:
        if self._opening is not None:
            opening, self._opening = self._opening, None
            await opening

    async def _send(self, ids: list[int], flush: bool) -> str:
        req = tokenizer_pb2.DetokenizeRequest(token_ids=ids, flush=flush)
        if self.first:
            req.model = self.model
            req.skip_special_tokens = self.skip_special_tokens
            self.first = False
        try:
            await self.call.write(req)
            resp = await self.call.read()
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        except asyncio.InvalidStateError:  # the call already ended (the tokenizer went away): retryable
            raise Unavailable("tokenizer: detokenize stream ended") from None
        if resp is grpc.aio.EOF:
            raise Unavailable("tokenizer: detokenize stream ended")
        return resp.text

    async def finish(self) -> None:
        """Half-close and read to the end, so the tokenizer's side ends cleanly."""
        try:
            await self._opened()
            await self.call.done_writing()
            while await self.call.read() is not grpc.aio.EOF:
                pass
        except (grpc.aio.AioRpcError, asyncio.CancelledError, FolioError):
            self.call.cancel()

    def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
        self.call.cancel()
