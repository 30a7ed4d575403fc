"""The engine's end of the fast lane (services/common/fast_lane.py, docs/router.md): a plain socket server in the
engine server's event loop. Each connection takes one request frame and streams the same messages the gRPC
`GenerateStream` call would (`EngineServicer._generate`), read and written by the loop's own selector.

The request's first message is written by the engine thread itself, on a duplicate
of the socket's descriptor, as the step that made the token returns (`_Connection.writable` / `write`, called
there; EngineServicer._send_first; not with --core-process, whose loop hands it over); the event loop writes
the rest.

A connection opened ahead waits for its request; a draining server closes the waiting ones (the router then
fails over, as from an opened gRPC call ended unused) and lets the streaming ones finish within the drain's grace.
The router closing a connection cancels its request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from google.protobuf.message import DecodeError

from protos.gen.folio.v1 import engine_pb2 as pb
from services.common import eager
from services.common.fast_lane import MESSAGE, REQUEST, FrameReader, ProtocolError, error_frame, frame
from services.common.grpc_errors import status_of

log = logging.getLogger("folio.engine.fast_lane")


class FastLaneServer:
    """Serves `servicer._generate` over fast-lane connections on `host`, any free port (`address` once started)."""

    def __init__(self, servicer):
        self.servicer = servicer
        self.address: str | None = None
        self.draining = False
        self.waiting: set[_Connection] = set()
        """Connections opened ahead, their request not yet come."""
        self.serving: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._drained_at = 0.0

    async def start(self, host: str, port: int = 0) -> str:
        self._server = await asyncio.get_running_loop().create_server(lambda: _Connection(self), host, port)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"{host}:{port}"
        return self.address

    def drain(self) -> None:
        """Take no more requests: the connections waiting for one close (those streaming go on)."""
        if not self.draining:
            self.draining = True
            self._drained_at = time.monotonic()
        for c in list(self.waiting):
            c.transport.close()

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop: take no more requests, give those streaming until `grace_s` after the drain began to finish (as
        the gRPC server gives its calls in flight), then close every connection."""
        self.drain()
        if self._server is not None:
            self._server.close()
        until = self._drained_at + grace_s
        while self.serving and time.monotonic() < until:
            await asyncio.sleep(0.01)
        for c in list(self.serving):
            c.transport.close()


class _Connection(asyncio.Protocol):
    def __init__(self, lane: FastLaneServer):
        self.lane = lane
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None
        self._fd: int | None = None  # a duplicate of the socket's, for the engine thread's write
        self._fd_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        if self.lane.draining:
            transport.close()
            return
        self._fd = os.dup(transport.get_extra_info("socket").fileno())  # (for `write`, off the request's way)
        self.lane.waiting.add(self)

    def data_received(self, data: bytes) -> None:
        received_ns = time.monotonic_ns()
        try:
            frames = self.reader.feed(data)
            if frames and (self.task is not None or len(frames) > 1 or frames[0][0] != REQUEST):
                raise ProtocolError("fast lane: one request frame per connection")
        except ProtocolError as e:
            log.warning("%s; closing the connection", e)
            self.transport.close()
            return
        if frames:
            self.lane.waiting.discard(self)
            self.lane.serving.add(self)
            try:
                request = pb.EngineGenerateRequest.FromString(frames[0][1])
            except DecodeError as e:
                log.warning("fast lane: a request frame that is not an EngineGenerateRequest (%s); closing the "
                            "connection", e)
                self.transport.close()
                return
            self.task = eager.start(self._serve(request, received_ns))  # the engine has it before this returns

    def connection_lost(self, exc) -> None:
        self.lane.waiting.discard(self)
        self.lane.serving.discard(self)
        with self._fd_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the router left: _generate aborts the request

    def writable(self) -> bool:
        """On the engine thread: nothing is waiting in the transport's buffer (so a write from here keeps the
        order) and the connection is open."""
        return self._fd is not None and not self.transport.is_closing() and not self.transport.get_write_buffer_size()

    def write(self, msg: pb.EngineGenerateResponse) -> None:
        """On the engine thread: the message written now; what the socket does not take at once goes through
        the loop (before anything the handler writes later, which reaches the loop after this)."""
        data = frame(MESSAGE, msg.SerializeToString())
        with self._fd_lock:
            if self._fd is None:
                return  # gone meanwhile: the handler is being cancelled
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                return
        if n < len(data):
            self._loop.call_soon_threadsafe(self.transport.write, data[n:])

    async def _serve(self, request: pb.EngineGenerateRequest, received_ns: int) -> None:
        deadline = time.monotonic() + request.timeout_ms / 1e3 if request.timeout_ms else None
        write = self.transport.write
        try:
            async for msg in self.lane.servicer._generate(request, received_ns, deadline, self):
                write(frame(MESSAGE, msg.SerializeToString()))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the error frame is this wire's status
            code, message = status_of(e)
            write(error_frame(code.name, message))
        finally:
            self.transport.close()  # (after what was written is flushed)
