"""Engine calls opened ahead of their requests (GenerateStream): the router's GrpcEngineClient against the
engine's real EngineServicer over loopback gRPC, with a scripted engine behind the servicer (no model).

Shown: the second request to an engine rides a call opened ahead (the first opens them); the tokens are
the same either way; a deadline ends the call DEADLINE_EXCEEDED and aborts the request on the engine; a
cancelled call aborts it; a draining engine ends its unused opened calls at once; an engine without
GenerateStream gets Generate."""

from __future__ import annotations

import asyncio
import time
import types

import grpc
import pytest

from protos.gen.folio.v1 import engine_pb2_grpc, tokenizer_pb2_grpc
from services.common.errors import DeadlineExceeded
from services.common.grpc_errors import ErrorInterceptor
from services.common.outputs import RequestDelta, SequenceDelta
from services.common.sampling_params import SamplingParams
from services.engine.server import EngineServicer
from services.router.clients import EngineFailed, EngineRequest
from services.router.grpc_clients import GrpcEngineClient


class ScriptedEngine:
    """AsyncEngine's interface for the servicer: each request gets prompt[-1] + 1, + 2, ... one token per
    `step_s`, up to max_tokens; aborts are recorded."""

    def __init__(self, step_s: float = 0.0):
        self.step_s = step_s
        self.engine = types.SimpleNamespace(tokenizer=None, requests={})
        self.added: list[str] = []
        self.aborted: list[str] = []
        self._tasks: list[asyncio.Task] = []

    async def add_request(self, rid, ids, params):
        self.added.append(rid)
        q: asyncio.Queue = asyncio.Queue()
        self._tasks.append(asyncio.ensure_future(self._run(rid, ids, params, q)))
        return q

    async def _run(self, rid, ids, params, q):
        n = params.max_tokens
        for k in range(n):
            await asyncio.sleep(self.step_s)
            last = k == n - 1
            q.put_nowait(RequestDelta(rid, [SequenceDelta(0, [ids[-1] + k + 1], None, 0.0,
                                                          "length" if last else None)], last))

    def abort(self, rid):
        self.aborted.append(rid)


async def _serve(servicer=None):
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    if servicer is not None:
        engine_pb2_grpc.add_EngineServicer_to_server(servicer, server)
    else:  # a server without the Engine service's GenerateStream: an older engine stands in as "none"
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(tokenizer_pb2_grpc.TokenizerServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _req(rid: str, max_tokens: int = 3) -> EngineRequest:
    return EngineRequest(rid, "", [10, 20], SamplingParams(temperature=0, max_tokens=max_tokens))


async def _tokens(call) -> list[int]:
    return [t for m in [m async for m in call.messages()] for s in m.sequences for t in s.token_ids]


async def _until(cond, timeout_s: float = 30.0):
    """Wait for cond() on the loop. Generous: on a loaded 2-core CI machine a background opening can take
    seconds (a 5 s limit timed out once in a full-suite run at load average 10)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


def test_requests_after_the_first_ride_calls_opened_ahead_with_the_same_tokens():
    async def main():
        engine = ScriptedEngine()
        server, addr = await _serve(EngineServicer(engine, "m", "e0"))
        client = GrpcEngineClient()
        try:
            first = client.generate(addr, _req("r0"), 30)
            assert first._sending is None  # nothing opened yet: Generate, and the opening starts now
            assert await _tokens(first) == [21, 22, 23]
            await _until(lambda: all(c.ready for c in client._opened[addr]) and len(client._opened[addr]) == 2)
            second = client.generate(addr, _req("r1"), 30)
            assert second._sending is not None  # written to an opened call
            assert await _tokens(second) == [21, 22, 23]
            await _until(lambda: len(client._opened[addr]) == 2)  # replaced soon after its first message
            assert engine.added == ["r0", "r1"] and engine.aborted == []
        finally:
            await client.close()
            await server.stop(0)
    asyncio.run(main())


def test_deadline_and_cancel_on_an_opened_call_abort_the_request_on_the_engine():
    async def main():
        engine = ScriptedEngine(step_s=0.05)
        server, addr = await _serve(EngineServicer(engine, "m", "e0"))
        client = GrpcEngineClient()
        try:
            await _tokens(client.generate(addr, _req("warm", 1), 30))
            await _until(lambda: any(c.ready for c in client._opened.get(addr, [])))
            late = client.generate(addr, _req("late", 100), 0.2)
            assert late._sending is not None
            with pytest.raises(EngineFailed) as e:
                await _tokens(late)
            assert isinstance(e.value.error, DeadlineExceeded)
            await _until(lambda: "late" in engine.aborted)  # the engine freed it
            await _until(lambda: any(c.ready for c in client._opened.get(addr, [])))
            gone = client.generate(addr, _req("gone", 100), 30)
            msgs = gone.messages()
            await msgs.__anext__()  # streaming
            gone.cancel()
            await msgs.aclose()
            await _until(lambda: "gone" in engine.aborted)
        finally:
            await client.close()
            await server.stop(0)
    asyncio.run(main())


def test_the_engine_timeout_alone_ends_the_call_deadline_exceeded():
    async def main():
        from protos.gen.folio.v1 import engine_pb2

        engine = ScriptedEngine(step_s=0.05)
        server, addr = await _serve(EngineServicer(engine, "m", "e0"))
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                call = engine_pb2_grpc.EngineStub(ch).GenerateStream()
                await call.write(engine_pb2.EngineGenerateRequest(request_id="t", prompt_token_ids=[1],
                                                                  params=_pb_params(100), timeout_ms=150))
                await call.done_writing()
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in call:
                        pass
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await _until(lambda: "t" in engine.aborted)
        finally:
            await server.stop(0)
    asyncio.run(main())


def _pb_params(max_tokens: int):
    from services.common.convert import params_to_pb

    return params_to_pb(SamplingParams(temperature=0, max_tokens=max_tokens))


def test_a_draining_engine_ends_its_unused_opened_calls_at_once():
    async def main():
        servicer = EngineServicer(ScriptedEngine(), "m", "e0")
        server, addr = await _serve(servicer)
        client = GrpcEngineClient()
        try:
            await _tokens(client.generate(addr, _req("r0"), 30))
            await _until(lambda: len(client._opened[addr]) == 2 and all(c.ready for c in client._opened[addr]))
            calls = [c.call for c in client._opened[addr]]
            servicer.drain()
            await _until(lambda: all(c.done() for c in calls), timeout_s=2)  # not after the drain's grace
            assert [await c.code() for c in calls] == [grpc.StatusCode.OK] * 2
            # such a call, had it been taken just then, fails over like an engine that went away
            from services.router.grpc_clients import GrpcEngineCall
            with pytest.raises(EngineFailed) as e:
                await _tokens(GrpcEngineCall(calls[0], _req_pb(), 30))
            assert e.value.error.status == "UNAVAILABLE"
        finally:
            await client.close()
            await server.stop(0)
    asyncio.run(main())


def _req_pb():
    from protos.gen.folio.v1 import engine_pb2

    return engine_pb2.EngineGenerateRequest(request_id="x", prompt_token_ids=[1], params=_pb_params(1))


def test_an_engine_without_generate_stream_gets_generate():
    async def main():
        server, addr = await _serve(None)
        client = GrpcEngineClient()
        try:
            with pytest.raises(EngineFailed):  # Generate is not there either: the call fails as before
                await _tokens(client.generate(addr, _req("r0"), 5))
            await _until(lambda: addr in client._plain)
            assert client.generate(addr, _req("r1"), 5)._sending is None
            await _until(lambda: client._held(addr) == [])  # the failed openings are dropped, none reopened
        finally:
            await client.close()
            await server.stop(0)
    asyncio.run(main())
