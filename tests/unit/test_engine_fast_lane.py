"""The engine fast lane (services/common/fast_lane.py): the router's GrpcEngineClient with fast_lane against the
engine's real EngineServicer and FastLaneServer over loopback, a scripted engine behind them (no model).

Shown: the engine names its lane in an opened call's metadata and later requests ride lane connections with the
same tokens; a deadline and a cancel abort the request on the engine; an engine error arrives as its domain error;
a draining engine closes the connections waiting for a request (a request on one fails over); an unreachable
lane is forgotten and gRPC serves; the frame reader splits and refuses as it should; the engine thread (a real
AsyncEngine over a stepped stand-in) writes each lane request's first message, and the stream is what gRPC's is."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from services.common.engine_load import EngineLoad
from services.common.errors import DeadlineExceeded, NotFound
from services.common.fast_lane import ERROR, MESSAGE, METADATA_KEY, REQUEST, FrameReader, ProtocolError, frame
from services.common.outputs import RequestDelta, SequenceDelta
from services.engine.fast_lane import FastLaneServer, _Connection
from services.engine.server import EngineServicer
from services.router.clients import EngineFailed
from services.router.fast_lane_client import FastLaneCall
from services.router.grpc_clients import GrpcEngineCall, GrpcEngineClient
from tests.unit.test_engine_calls_ahead import ScriptedEngine, _req, _req_pb, _serve, _tokens, _until


async def _stack(engine, lane_host="127.0.0.1"):
    servicer = EngineServicer(engine, "m", "e0")
    lane = FastLaneServer(servicer)
    port = int((await lane.start("127.0.0.1")).rsplit(":", 1)[1])
    servicer.opening_metadata = ((METADATA_KEY, f"{lane_host}:{port}"),)
    server, addr = await _serve(servicer)
    return servicer, lane, server, addr


async def _lane_ready(client, addr):
    await _until(lambda: any(c.ready for c in client.lanes._held.get(addr, [])))


def test_requests_ride_the_lane_once_learnt_with_the_same_tokens():
    async def main():
        engine = ScriptedEngine()
        _, lane, server, addr = await _stack(engine)
        client = GrpcEngineClient(fast_lane=True)
        try:
            assert isinstance(client.generate(addr, _req("r0"), 30), GrpcEngineCall)  # nothing learnt yet
            await _lane_ready(client, addr)
            for rid in ("r1", "r2", "r3"):  # more than `depth`: each taken connection is replaced
                call = client.generate(addr, _req(rid), 30)
                assert isinstance(call, FastLaneCall)
                assert await _tokens(call) == [21, 22, 23]
                await _lane_ready(client, addr)
            assert engine.added[1:] == ["r1", "r2", "r3"] and engine.aborted == []
        finally:
            await client.close()
            await lane.close()
            await server.stop(0)
    asyncio.run(main())


def test_deadline_cancel_and_engine_errors_on_the_lane():
    async def main():
        engine = ScriptedEngine(step_s=0.05)
        _, lane, server, addr = await _stack(engine)
        client = GrpcEngineClient(fast_lane=True)
        try:
            await _tokens(client.generate(addr, _req("warm", 1), 30))
            await _lane_ready(client, addr)
            late = client.generate(addr, _req("late", 100), 0.2)
            assert isinstance(late, FastLaneCall)
            with pytest.raises(EngineFailed) as e:
                await _tokens(late)
            assert isinstance(e.value.error, DeadlineExceeded)
            await _until(lambda: "late" in engine.aborted)  # the engine freed it
            await _lane_ready(client, addr)
            gone = client.generate(addr, _req("gone", 100), 30)
            msgs = gone.messages()
            await msgs.__anext__()  # streaming
            gone.cancel()
            await msgs.aclose()
            await _until(lambda: "gone" in engine.aborted)
            await _lane_ready(client, addr)
            wrong = _req("wrong")
            wrong.model = "other"
            with pytest.raises(EngineFailed) as e:
                await _tokens(client.generate(addr, wrong, 30))
            assert isinstance(e.value.error, NotFound) and "other" in str(e.value.error)
        finally:
            await client.close()
            await lane.close()
            await server.stop(0)
    asyncio.run(main())


def test_a_draining_engine_closes_its_waiting_lane_connections():
    async def main():
        servicer, lane, server, addr = await _stack(ScriptedEngine())
        client = GrpcEngineClient(fast_lane=True)
        try:
            await _tokens(client.generate(addr, _req("r0"), 30))
            await _until(lambda: sum(c.ready for c in client.lanes._held.get(addr, [])) == 2)
            conns = list(client.lanes._held[addr])
            lane.drain()
            await _until(lambda: all(c.lost for c in conns), timeout_s=2)
            assert client.lanes.take(addr) is None  # none is handed out
            # one taken just before the drain fails over like an engine that went away
            c = conns[0]
            c.lost, c.ready = False, True
            c.transport = _NullTransport()
            with pytest.raises(EngineFailed) as e:
                await _tokens(FastLaneCall(c, _req_pb(), 30))
            assert e.value.error.status == "UNAVAILABLE"
        finally:
            await client.close()
            await lane.close()
            await server.stop(0)
    asyncio.run(main())


def test_a_stopping_engine_lets_its_lane_requests_finish_within_the_grace():
    """close(grace_s) (the engine server's stop after the drain): a request streaming on the lane runs to its end
    (no failover: it finishes where it started), and the lane closes as soon as it has; with no grace it is cut."""
    async def long_request_on_the_lane(n_tokens):
        """A stack whose client has learnt the lane, and a request of `n_tokens` streaming on it."""
        _, lane, server, addr = await _stack(ScriptedEngine(step_s=0.02))
        client = GrpcEngineClient(fast_lane=True)
        await _tokens(client.generate(addr, _req("r0", 1), 30))
        await _lane_ready(client, addr)
        call = client.generate(addr, _req("long", n_tokens), 30)
        assert isinstance(call, FastLaneCall)
        return lane, server, client, call

    async def main():
        lane, server, client, call = await long_request_on_the_lane(20)
        try:
            msgs = call.messages()
            got = [t for s in (await msgs.__anext__()).sequences for t in s.token_ids]  # streaming on the lane

            async def rest():
                async for m in msgs:
                    got.extend(t for s in m.sequences for t in s.token_ids)
            reading = asyncio.ensure_future(rest())
            lane.drain()
            t0 = time.monotonic()
            await lane.close(grace_s=10)
            await reading
            assert got == list(range(21, 41)) and call._inner is None  # all of it on the lane, no fallback
            assert time.monotonic() - t0 < 5 and not lane.serving
        finally:
            await client.close()
            await lane.close()
            await server.stop(0)

    async def cut():
        lane, server, client, call = await long_request_on_the_lane(200)
        try:
            msgs = call.messages()
            await msgs.__anext__()  # streaming
            await lane.close()
            with pytest.raises(EngineFailed, match="fast-lane connection closed"):
                async for _ in msgs:
                    pass
        finally:
            await client.close()
            await server.stop(0)
    asyncio.run(main())
    asyncio.run(cut())


class _NullTransport:
    def write(self, data):
        pass

    def close(self):
        pass


def test_an_unreachable_lane_is_forgotten_and_grpc_serves():
    async def main():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        s.close()  # nothing listens there
        engine = ScriptedEngine()
        servicer, lane, server, addr = await _stack(engine)
        servicer.opening_metadata = ((METADATA_KEY, f"127.0.0.1:{dead}"),)
        client = GrpcEngineClient(fast_lane=True)
        try:
            await _tokens(client.generate(addr, _req("r0"), 30))
            await _until(lambda: addr in client.lanes._held)
            await _until(lambda: addr not in client.lanes.lanes)
            call = client.generate(addr, _req("r1"), 30)
            assert isinstance(call, GrpcEngineCall)
            assert await _tokens(call) == [21, 22, 23]
        finally:
            await client.close()
            await lane.close()
            await server.stop(0)
    asyncio.run(main())


def test_frames_split_anywhere_and_bad_frames_refused():
    data = frame(REQUEST, b"abc") + frame(MESSAGE, b"") + frame(ERROR, b"x" * 300)
    r = FrameReader()
    got = [f for i in range(len(data)) for f in r.feed(data[i:i + 1])]
    assert got == [(REQUEST, b"abc"), (MESSAGE, b""), (ERROR, b"x" * 300)]
    with pytest.raises(ProtocolError):
        FrameReader().feed(b"\x00\x00\x00\x01Zq")


class _SteppedEngine:
    """LLMEngine's interface for AsyncEngine: every step gives each request its next token (prompt[-1] + k),
    up to max_tokens, with the first-token timing stamps a real engine sets."""

    def __init__(self):
        self.requests: dict[str, list] = {}
        self.blocks = SimpleNamespace(num_blocks=10)
        self.step_phase, self.step_batch = "idle", (0, 0)
        self.tokenizer = None

    def get_stats(self):
        return EngineLoad(total_blocks=10, free_blocks=10, running=len(self.requests))

    def has_unfinished_requests(self):
        return bool(self.requests)

    def add_request(self, request_id, prompt, params, prompt_token_ids=None):
        self.requests[request_id] = [prompt_token_ids[-1], params.max_tokens, 0, time.monotonic()]

    def abort_request(self, request_id):
        return None if self.requests.pop(request_id, None) is None else RequestDelta(request_id, [], True)

    def step(self):
        time.sleep(0.002)
        out = []
        for rid, r in list(self.requests.items()):
            last, n, k, arrived = r
            r[2] = k = k + 1
            done = k >= n
            if done:
                del self.requests[rid]
            now = time.monotonic()
            out.append(RequestDelta(rid, [SequenceDelta(0, [last + k], None, 0.0, "length" if done else None)], done,
                                    arrival_time=arrived, first_scheduled_time=now, first_token_time=now))
        return out


async def _opened_ready(client, addr):
    await _until(lambda: any(c.ready for c in client._opened.get(addr, [])))


def test_the_engine_thread_writes_a_lane_requests_first_message_and_the_stream_is_grpcs():
    async def main():
        from services.engine.async_engine import AsyncEngine

        aengine = AsyncEngine(_SteppedEngine())
        aengine.start()
        _, lane, server, addr = await _stack(aengine)
        writers: list[str] = []
        real_write = _Connection.write

        def recording_write(self, msg):
            writers.append(threading.current_thread().name)
            real_write(self, msg)

        _Connection.write = recording_write
        plain = GrpcEngineClient()  # gRPC's opened calls
        direct = GrpcEngineClient(fast_lane=True)
        try:
            results = {}
            for name, client in (("plain", plain), ("direct", direct)):
                await _tokens(client.generate(addr, _req(f"{name}-warm"), 30))
                await (_lane_ready(client, addr) if client is direct else _opened_ready(client, addr))
                out = []
                for i, n in enumerate((3, 1, 5)):  # 1: the first message is also the last
                    call = client.generate(addr, _req(f"{name}{i}", n), 30)
                    assert isinstance(call, FastLaneCall if client is direct else GrpcEngineCall)
                    msgs = [m async for m in call.messages()]
                    assert msgs[0].first_token_path and any(h == "engine.sent" for h, _ in msgs[0].first_token_path)
                    assert msgs[-1].finished and msgs[-1].sequences[-1].finish_reason == "length"
                    out.append([t for m in msgs for s in m.sequences for t in s.token_ids])
                    await (_lane_ready(client, addr) if client is direct else _opened_ready(client, addr))
                results[name] = out
            assert results["plain"] == results["direct"] == [[21, 22, 23], [21], [21, 22, 23, 24, 25]]
            assert writers == ["engine-loop"] * 3  # only the lane requests' first messages, from the engine thread
        finally:
            _Connection.write = real_write
            await plain.close()
            await direct.close()
            await lane.close()
            await server.stop(0)
            await aengine.stop()
    asyncio.run(main())


async def _listener(on_connect):
    """A TCP listener on loopback whose connections `on_connect(reader, writer)` handles; (server, port)."""
    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_a_lane_that_closes_its_connections_at_once_is_forgotten_and_grpc_serves():
    async def main():
        async def reset(reader, writer):  # a sidecar resetting an undeclared port, the wrong listener
            writer.close()

        bad, port = await _listener(reset)
        engine = ScriptedEngine()
        servicer, lane, server, addr = await _stack(engine)
        servicer.opening_metadata = ((METADATA_KEY, f"127.0.0.1:{port}"),)
        client = GrpcEngineClient(fast_lane=True)
        try:
            await _tokens(client.generate(addr, _req("r0"), 30))
            await _until(lambda: addr in client.lanes._held)
            await _until(lambda: addr not in client.lanes.lanes)  # forgotten, not retried at once
            for rid in ("r1", "r2"):
                call = client.generate(addr, _req(rid), 30)
                assert isinstance(call, GrpcEngineCall)
                assert await _tokens(call) == [21, 22, 23]
                await _opened_ready(client, addr)
            assert addr not in client.lanes.lanes
        finally:
            await client.close()
            await lane.close()
            await server.stop(0)
            bad.close()
    asyncio.run(main())


def test_a_request_whose_lane_connection_closes_unanswered_is_served_by_grpc():
    async def main():
        async def swallow(reader, writer):  # takes the request, then closes without a byte back
            await reader.read(5)
            writer.close()

        bad, port = await _listener(swallow)
        engine = ScriptedEngine()
        servicer, lane, server, addr = await _stack(engine)
        servicer.opening_metadata = ((METADATA_KEY, f"127.0.0.1:{port}"),)
        client = GrpcEngineClient(fast_lane=True)
        try:
            await _tokens(client.generate(addr, _req("r0"), 30))
            await _lane_ready(client, addr)
            call = client.generate(addr, _req("r1"), 30)
            assert isinstance(call, FastLaneCall)
            assert await _tokens(call) == [21, 22, 23]  # by gRPC, not failed
            assert engine.added == ["r0", "r1"]
            assert addr not in client.lanes.lanes  # and the lane forgotten
        finally:
            await client.close()
            await lane.close()
            await server.stop(0)
            bad.close()
    asyncio.run(main())


def test_a_bad_request_frame_closes_that_connection_and_the_lane_serves_on(caplog):
    async def main():
        engine = ScriptedEngine()
        _, lane, server, addr = await _stack(engine)
        host, port = lane.address.rsplit(":", 1)
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(frame(REQUEST, b"\xff\xff\xff not a protobuf"))
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing sent
            writer.close()
            assert engine.added == []
            client = GrpcEngineClient(fast_lane=True)
            try:
                await _tokens(client.generate(addr, _req("r0"), 30))
                await _lane_ready(client, addr)
                call = client.generate(addr, _req("r1"), 30)
                assert isinstance(call, FastLaneCall)
                assert await _tokens(call) == [21, 22, 23]
            finally:
                await client.close()
        finally:
            await lane.close()
            await server.stop(0)
    asyncio.run(main())
    assert any("not an EngineGenerateRequest" in r.getMessage() for r in caplog.records)
