"""The engine fast lane's wire: length-prefixed frames over a plain stream socket, between the router and an
engine on the same network (docs/router.md, "The engine fast lane").

One connection carries one request: the router writes a request frame (an `EngineGenerateRequest`, the same
message the gRPC `GenerateStream` call carries, its deadline in `timeout_ms`); the engine answers with message
frames (`EngineGenerateResponse`) and ends with the finished one, or with an error frame. The first message is
written by the engine's step thread itself as the step that made the token returns, where the engine runs one
(services/engine/fast_lane.py), so no wake-up of its event loop lies on the first token's way. The router closing the
connection cancels the request (the engine aborts it within a step). Why: a grpc.aio message passes two more
threads on each side (the transport's poller and the completion-queue poller) before it reaches the event loop;
a socket read by the loop's own selector does not.

A frame: 4 bytes big-endian payload length, 1 byte kind, the payload.
"""

from __future__ import annotations

import json
import struct

REQUEST = b"Q"
MESSAGE = b"M"
ERROR = b"E"
KINDS = (REQUEST, MESSAGE, ERROR)

METADATA_KEY = "folio-fast-lane"
"""The engine names its fast lane's address (host:port) in its GenerateStream calls' initial metadata."""

MAX_FRAME = 64 << 20
"""A frame longer than this is a protocol error (the gRPC channels' own message limit is of this order)."""

_HEAD = struct.Struct(">IB")


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this wire."""


def frame(kind: bytes, payload: bytes) -> bytes:
    return _HEAD.pack(len(payload), kind[0]) + payload


def error_frame(status: str, message: str) -> bytes:
    """An error frame: the gRPC status code name (services/common/errors.py) and the message."""
    return frame(ERROR, json.dumps({"status": status, "message": message}).encode())


def parse_error(payload: bytes) -> tuple[str, str]:
    d = json.loads(payload)
    return str(d["status"]), str(d["message"])


class FrameReader:
    """Bytes in (as a protocol's data_received gets them), whole frames out."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The (kind, payload) frames completed by `data`, in order. Raises ProtocolError."""
        buf = self._buf
        buf += data
        out = []
        while len(buf) >= _HEAD.size:
            n, kind = _HEAD.unpack_from(buf)
            kind = bytes((kind,))
            if kind not in KINDS or n > MAX_FRAME:
                raise ProtocolError(f"fast lane: bad frame (kind {kind!r}, {n} bytes)")
            if len(buf) < _HEAD.size + n:
                break
            out.append((kind, bytes(buf[_HEAD.size:_HEAD.size + n])))
            del buf[:_HEAD.size + n]
        return out
