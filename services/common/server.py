"""The gRPC server every Folio service runs: error mapping, health, reflection, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.grpc_errors import ErrorInterceptor

log = logging.getLogger("folio.server")

# Keepalive agrees on both ends: clients ping every KEEPALIVE_TIME_MS (also with no call in flight,
# so a dead peer is noticed before the next request) and give up on a peer silent for
# KEEPALIVE_TIMEOUT_MS; servers accept pings that often (gRPC's default server policy refuses pings
# more often than every 5 minutes without data and answers GOAWAY "too_many_pings").
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
_MESSAGE_LIMITS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]
SERVER_OPTIONS = _MESSAGE_LIMITS + [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.so_reuseport", 0),
]
CHANNEL_OPTIONS = _MESSAGE_LIMITS + [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
]


class GrpcServer:
    """An asyncio gRPC server with health (grpc.health.v1) and reflection for `service_names`."""

    def __init__(self, service_names: list[str], host: str = "127.0.0.1", port: int = 0,
                 interceptors: list[grpc.aio.ServerInterceptor] | None = None,
                 tls: tuple[bytes, bytes] | None = None, unix_socket: str | None = None):
        """`tls`: (certificate chain PEM, private key PEM) to serve TLS only; None serves plaintext.
        `unix_socket`: also listen on this unix-domain socket path, for clients on the same host that reach
        it so (no faster than loopback TCP on the H200 host: bench/grpc_hops.py, docs/router.md)."""
        # Extra interceptors (e.g. authentication) run before the error mapping.
        self.server = grpc.aio.server(interceptors=[*(interceptors or []), ErrorInterceptor()], options=SERVER_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        self._stop: asyncio.Event | None = None
        """Set by SIGTERM/SIGINT or request_stop() while run() runs."""
        reflection.enable_server_reflection(
            self.service_names + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        creds = grpc.ssl_server_credentials([(tls[1], tls[0])]) if tls is not None else None

        def bind(address: str) -> int:
            return self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)

        self.port = bind(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind {host}:{port}")
        self.address = f"{host}:{self.port}"
        self.unix_address: str | None = None
        """`unix:PATH` when also listening on a unix-domain socket."""
        if unix_socket:
            with contextlib.suppress(FileNotFoundError):  # a socket file left by an earlier process, not any file
                if stat.S_ISSOCK(os.stat(unix_socket).st_mode):
                    os.unlink(unix_socket)
            if bind(f"unix:{unix_socket}") == 0:
                raise OSError(f"cannot bind unix:{unix_socket}")
            self.unix_address = f"unix:{unix_socket}"

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def run(self, grace_s: float, on_drain: Callable[[], Awaitable[None]] | None = None,
                  on_ready: Callable[[], Awaitable[None]] | None = None,
                  ready: Callable[[], bool] | None = None) -> None:
        """Start, report SERVING, and run until SIGTERM/SIGINT; then report NOT_SERVING, let `on_drain`
        stop new work elsewhere (e.g. leave the Redis registry), and give in-flight calls `grace_s`.
        With `ready`, health follows it instead (polled 4 times a second): SERVING only while it holds."""
        stop = self._stop = asyncio.Event()  # handlers first: a SIGTERM right after "ready" must drain
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.server.start()
        if on_ready is not None:
            await on_ready()
        follow = asyncio.create_task(self._follow(ready)) if ready is not None else None
        if ready is None:
            await self.set_serving(True)
        log.info("%s SERVING on %s", ",".join(self.service_names), self.address)
        await stop.wait()
        log.info("draining (grace %.1fs)", grace_s)
        _exit_if_stuck_after(grace_s + EXIT_MARGIN_S)
        if follow is not None:
            follow.cancel()
        await self.set_serving(False)
        if on_drain is not None:
            try:
                await on_drain()
            except Exception:  # noqa: BLE001 - draining must go on
                log.exception("drain hook failed")
        await self.server.stop(grace_s)
        log.info("stopped")


    def request_stop(self) -> None:
        """Drain and stop as on SIGTERM (call on the event loop; e.g. when the service cannot go on)."""
        if self._stop is not None:
            self._stop.set()

    async def _follow(self, ready: Callable[[], bool], interval_s: float = 0.25) -> None:
        serving = None
        while True:
            now = bool(ready())
            if now != serving:
                await self.set_serving(now)
                log.info("health: %s", "SERVING" if now else "NOT_SERVING")
                serving = now
            await asyncio.sleep(interval_s)


EXIT_MARGIN_S = 10.0
"""Seconds past the drain grace after which a process that has not exited leaves anyway."""


def _exit_if_stuck_after(seconds: float) -> None:
    """Leave the process (status 1, logged) if it is still alive `seconds` from now: a drain must end
    in bounded time even if a thread or an interpreter-exit hook never returns, so an orchestrator's
    SIGTERM means "gone within grace + margin", not "gone at SIGKILL"."""
    def guard():
        log.error("still running %.0fs after SIGTERM; exiting now", seconds)
        logging.shutdown()
        os._exit(1)

    t = threading.Timer(seconds, guard)
    t.daemon = True
    t.start()


def leave(rc: int | None) -> None:
    """End a service process whose main() has returned (server, workers, Redis and telemetry closed by then) without
    the interpreter's finalization: that tears torch and the model down object by object (~0.65 s per engine stop on
    the CPU machine, seconds on a loaded host) and waits for any thread still inside an import (a router stopped
    during its structured-output warm-up: 1-2.75 s). Each service's __main__ calls it."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(int(rc or 0))


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


async def wait_serving(address: str, timeout_s: float, service: str = "") -> None:
    """Poll the standard health check until SERVING (raises TimeoutError)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout_s:.0f}s")
            await asyncio.sleep(0.1)
