"""The router's end of the engine fast lane (services/common/fast_lane.py, docs/router.md): connections opened
ahead to each engine's lane, one request per connection, read by this process's event loop itself.

An engine names its lane in the initial metadata of the GenerateStream calls the router opens ahead
(`FastLanes.learn`); from then on `depth` connections are kept open to it and a request takes a ready one
(`FastLaneCall`, the `EngineCall` interface of services/router/clients.py). A lane that cannot be reached, or
whose connections the other end closes before sending anything (a sidecar that resets an undeclared port, the
wrong listener), is forgotten for `RETRY_AFTER_S` (the engine's gRPC calls serve it, as before); a request whose
connection was closed so goes to the same engine by gRPC instead of failing.
"""

from __future__ import annotations

import asyncio
import logging
import time

from protos.gen.folio.v1 import engine_pb2
from services.common.errors import Cancelled, DeadlineExceeded, FolioError, Unavailable, from_status
from services.common.fast_lane import ERROR, METADATA_KEY, REQUEST, FrameReader, ProtocolError, frame, parse_error
from services.router.clients import EngineFailed
from services.router.engine_messages import message_from_pb

log = logging.getLogger("folio.router")

RETRY_AFTER_S = 30.0
"""A lane that could not be reached is not tried again for this long (its engine is served by gRPC meanwhile)."""

REFILL_DELAY_S = 0.005
"""How long after a taken connection's first message its replacement opens (as grpc_clients.REFILL_DELAY_S)."""


class FastLanes:
    """Per engine address: its lane (host:port) and the connections held open to it."""

    def __init__(self, depth: int = 2):
        self.depth = depth
        self.lanes: dict[str, str] = {}
        self._held: dict[str, list[_Connection]] = {}
        self._unreachable_until: dict[str, float] = {}
        self._closed = False

    def learn(self, address: str, metadata) -> None:
        """An opened call's initial metadata: where the engine at `address` serves its fast lane, if it does
        (and the connections to it topped up: an engine restarted on the same lane left them closed)."""
        lane = next((v for k, v in metadata or () if k == METADATA_KEY), None)
        if lane is None or time.monotonic() < self._unreachable_until.get(lane, 0.0):
            return
        self.lanes[address] = lane
        self._fill(address)

    def take(self, address: str) -> _Connection | None:
        held = self._held.get(address)
        if not held:
            return None
        held[:] = [c for c in held if not c.lost]
        conn = next((c for c in held if c.ready), None)
        if conn is not None:
            held.remove(conn)
        return conn

    def fill_soon(self, address: str) -> None:
        asyncio.get_running_loop().call_later(REFILL_DELAY_S, self._fill, address)

    def _fill(self, address: str) -> None:
        lane = self.lanes.get(address)
        if lane is None or self._closed:
            return
        held = self._held.setdefault(address, [])
        held[:] = [c for c in held if not c.lost]
        while len(held) < self.depth:
            held.append(_Connection(lane, lambda e, a=address, l=lane: self._unreachable(a, l, e)))

    def _unreachable(self, address: str, lane: str, error: BaseException) -> None:
        self._unreachable_until[lane] = time.monotonic() + RETRY_AFTER_S
        if self.lanes.get(address) == lane:
            del self.lanes[address]
            log.warning("engine %s: its fast lane %s cannot be reached (%s): gRPC calls serve it", address, lane,
                        error)

    async def close(self) -> None:
        self._closed = True
        for held in self._held.values():
            for c in held:
                c.close()


class _Connection(asyncio.Protocol):
    """One connection to an engine's lane: opened at once, `ready` once up; frames in on `queue`
    ((kind, payload), then (None, None) when it closed)."""

    def __init__(self, lane: str, unreachable):
        self.ready = False
        self.lost = False
        self.received_any = False
        """Whether the other end ever sent a byte (an engine always answers a request with a frame)."""
        self._closed_here = False
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self._unreachable = unreachable
        host, port = lane.rsplit(":", 1)
        self._opening = asyncio.ensure_future(self._open(host, int(port), unreachable))

    async def _open(self, host: str, port: int, unreachable) -> None:
        try:
            await asyncio.get_running_loop().create_connection(lambda: self, host, port)
        except OSError as e:
            self.lost = True
            unreachable(e)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.ready = not self.lost

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            for f in self.reader.feed(data):
                self.queue.put_nowait(f)
        except ProtocolError as e:
            log.warning("%s", e)
            self.close()

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.ready = False
        if not self._closed_here and not self.received_any:  # (a draining engine's too: it is going away)
            self._unreachable(exc or ConnectionResetError("closed by the other end before sending anything"))
        self.queue.put_nowait((None, None))

    def close(self) -> None:
        self._closed_here = True
        self.lost = True
        self._opening.cancel()
        if self.transport is not None:
            self.transport.close()


class FastLaneCall:
    """One request over a fast-lane connection: written at once; `timeout_s` enforced here and, through
    `timeout_ms`, by the engine; `on_first` runs once the first message was read (or the call ended).
    `fallback(remaining_s)`: the same request as another EngineCall (gRPC), made when the connection closes
    before the engine sent anything."""

    def __init__(self, conn: _Connection, request: engine_pb2.EngineGenerateRequest, timeout_s: float | None,
                 on_first=None, fallback=None):
        self._conn = conn
        self._failed: FolioError | None = None
        self._cancelled = False
        self._on_first = on_first
        self._fallback = fallback
        self._inner = None
        self._deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        self._timer = None
        if timeout_s is not None:
            request.timeout_ms = max(1, int(timeout_s * 1000))
            self._timer = asyncio.get_running_loop().call_later(timeout_s, self.fail,
                                                                DeadlineExceeded("deadline exceeded"))
        conn.transport.write(frame(REQUEST, request.SerializeToString()))

    def _first_done(self) -> None:
        on_first, self._on_first = self._on_first, None
        if on_first is not None:
            on_first()

    async def messages(self):
        got = False
        try:
            while True:
                kind, payload = await self._conn.queue.get()
                if kind is None:  # closed before the finished message
                    if self._failed is not None:
                        raise EngineFailed(self._failed)
                    if self._cancelled:
                        raise Cancelled("cancelled")
                    if not self._conn.received_any and self._fallback is not None:  # (the lane is forgotten now)
                        remaining = None if self._deadline is None else max(0.001, self._deadline - time.monotonic())
                        self._inner = self._fallback(remaining)
                        async for m in self._inner.messages():
                            yield m
                            self._first_done()
                        return
                    raise EngineFailed(Unavailable("engine: its fast-lane connection closed"
                                                   + ("" if got else " before the request's first message")))
                if kind == ERROR:
                    raise EngineFailed(from_status(*parse_error(payload)))
                msg = engine_pb2.EngineGenerateResponse.FromString(payload)
                yield message_from_pb(msg)
                if not got:
                    got = True
                    self._first_done()
                if msg.finished:
                    return
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._first_done()
            self._conn.close()

    def cancel(self) -> None:
        self._cancelled = True
        if self._timer is not None:
            self._timer.cancel()
        self._conn.close()  # the engine aborts the request
        if self._inner is not None:
            self._inner.cancel()
        self._first_done()

    def fail(self, error: FolioError) -> None:
        if self._inner is not None:
            self._inner.fail(error)
        elif not self._conn.lost:
            self._failed = error
            self._conn.close()
