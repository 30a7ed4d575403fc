"""Router process: the folio.v1.Router gRPC service over RouterCore (and, when asked, the HTTP API)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from protos.gen.folio.v1 import common_pb2, router_pb2 as pb, router_pb2_grpc
from services.common import cpu_affinity, cpu_latency, cpu_spinners, config as cfg, keep_awake, telemetry
from services.common.auth import ApiKeyInterceptor
from services.common.convert import FINISH_TO_PB, params_from_pb, position_to_pb
from services.common.errors import InvalidArgument
from services.common.request_limits import RequestLimits
from services.common.structured_output import warm_structured_outputs
from services.common.server import GrpcServer, configure_logging
from services.router.core import GenerateInput, RouterCore
from services.router.metrics import RouterMetrics

log = logging.getLogger("folio.router.server")


@dataclass
class RouterConfig:
    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = 50051
    """gRPC port (0: any free port)."""
    unix_socket: str | None = None
    """Also serve the gRPC API on this unix domain socket path, for clients on this host that reach it so
    (a front end, a sidecar; measured no faster than loopback TCP on the H200 host; docs/router.md)."""
    tokenizer: list[str] = field(default_factory=list)
    """Tokenizer service address host:port, one per model."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the engine registry."""
    stale_ms: int = 1500
    """Engines whose last report is older than this are not chosen."""
    reservation_ttl_ms: int = 10_000
    """A block reservation the engine never confirms is dropped after this."""
    max_attempts: int = 3
    """Engines tried per request (failures before the first token, failovers after)."""
    hung_after_s: float = 4.0
    """An engine with work whose step counter has not moved (and that sent nothing) for this long is hung:
    it is not chosen and its streams move to other engines (docs/reliability.md)."""
    first_step_s: float = 120.0
    """The same allowance while an engine has not yet completed its first step (compile, warm-up)."""
    http_port: int | None = None
    """Also serve the OpenAI-compatible HTTP API on this port (services.router.openai)."""
    api_key: str | None = None
    """Require 'authorization: Bearer <key>' on the gRPC API (metadata) and the HTTP API's /v1/*
    (default: $FOLIO_API_KEY); health, reflection and /metrics stay open."""
    tls_cert_file: str | None = None
    """PEM certificate chain: serve the gRPC and HTTP APIs over TLS only (with --tls-key-file)."""
    tls_key_file: str | None = None
    """PEM private key for --tls-cert-file."""
    tool_call_parser: Literal["hermes", "llama3_json", "mistral"] = "hermes"
    """How chat completions read the model's own tool calls under tool_choice auto: hermes
    (<tool_call>{...}</tool_call>), llama3_json or mistral ([TOOL_CALLS][...]), as vLLM's flag."""
    detokenize: Literal["local", "service"] = "local"
    """Where generated tokens become text: local (in this process, over the tokenizer service's own
    tokenizer.json when this process can read it, else through the service, with a warning in the log) or
    service (the tokenizer service's Detokenize stream, one round trip per engine message; docs/router.md)."""
    engine_calls_ahead: bool = True
    """Keep one GenerateStream call open per engine ahead of the next request, so a request's engine call
    is already set up when it comes (~0.6 ms less to the first token on the CPU machine); off while
    tracing, whose per-call spans belong to the request's trace (docs/router.md)."""
    engine_fast_lane: bool = True
    """With engine_calls_ahead: send requests over the engines' fast lanes where they serve one (a plain socket
    connection opened ahead per request, read by each side's event loop itself, no grpc.aio threads between, the
    first message written by the engine's step thread; services/router/fast_lane_client.py, docs/router.md:
    0.5-0.7 ms less outside the engine on the H200); else over the opened GenerateStream calls."""
    busy_loop: bool | None = None
    """While requests are in flight (and a second after), keep the event loop polling instead of sleeping
    between messages, so each one is picked up without a wake-up (one core kept busy meanwhile;
    services/common/keep_awake.py). None: on where this process may run on at least 8 CPUs, off on smaller
    hosts (docs/router.md)."""
    cpu_wake_latency_us: int | None = None
    """While requests are in flight (and a second after), hold this host's CPU wake-up latency at most this many
    microseconds (Linux PM QoS, /dev/cpu_dma_latency; 0: idle CPUs poll instead of halting, so the thread each
    hop wakes is running at once; the cost is idle CPUs kept busy meanwhile, host-wide). None: the host decides
    (it acts only through the host's cpuidle driver; the H200 VM has none: docs/router.md). Needs write access
    to the file, else it is logged and left (services/common/cpu_latency.py)."""
    poller_cpu: int | None = None
    """With the polling loop (--busy-loop): run grpc.aio's completion-queue poller thread on this CPU, and keep the CPU
    from halting while requests are in flight (an idle-priority spinner process there; services/common/cpu_spinners.py),
    so the gRPC API's messages wake that thread without a halted vCPU's exit (docs/router.md). None: off."""
    awake_cpus: str | None = None
    """With the polling loop (--busy-loop): keep these CPUs (a Linux CPU list) from halting while requests are in
    flight, an idle-priority spinner process on each (host-wide, for every thread woken there; the price: those CPUs
    kept busy meanwhile; services/common/cpu_spinners.py). None: off."""
    cpus: str | None = None
    """Run this process's threads on these CPUs only (a Linux CPU list: '15', '0-3,8'); with one CPU its event loop
    and gRPC poller thread wake each other there (services/common/cpu_affinity.py). None: any CPU."""
    warm_structured: bool = True
    """At start, on a thread, import xgrammar and build one grammar (~3 s of CPU), so that the first structured
    request does not pay it. Off: a router that will serve no structured output (the test suite's stacks, on a
    2-core machine where each router's warm-up takes CPU from the engines starting beside it)."""
    grace_s: float = 30.0
    """Seconds in-flight requests get to finish on SIGTERM."""
    log_level: str = "INFO"
    """Logging level."""
    limits: RequestLimits = field(default_factory=RequestLimits, init=False)
    # Request-size limits: their flags are RequestLimits' fields (services/common/request_limits.py).


def request_from_pb(r: pb.GenerateRequest, timeout_s: float | None,
                    limits: RequestLimits | None = None) -> GenerateInput:
    limits = limits or RequestLimits()
    which = r.WhichOneof("prompt")
    if which == "chat":  # counted before anything is built per message
        limits.check_count("messages", r.chat.messages, "max_messages")
    limits.check_n(r.params.n if r.params.HasField("n") else 1)
    inp = GenerateInput(params=params_from_pb(r.params), model=r.model or None, request_id=r.request_id or None,
                        add_generation_prompt=r.add_generation_prompt if r.HasField("add_generation_prompt") else True,
                        add_special_tokens=r.add_special_tokens if r.HasField("add_special_tokens") else True,
                        timeout_s=timeout_s)
    if which == "text":
        inp.prompt = r.text
    elif which == "chat":
        inp.messages = [{"role": m.role, "content": m.content} for m in r.chat.messages]
        if not inp.messages:
            raise InvalidArgument("messages: at least one message is required")
    elif which == "token_ids":
        inp.prompt_token_ids = list(r.token_ids.ids)
    else:
        raise InvalidArgument("prompt: give text, chat messages or token_ids")
    return inp


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, core: RouterCore, metrics: RouterMetrics | None = None):
        self.core = core
        self.metrics = metrics

    async def Generate(self, request: pb.GenerateRequest, context):
        handler_ns = time.monotonic_ns()
        inp = request_from_pb(request, context.time_remaining(), self.core.limits)
        chunks = self.core.generate(inp)
        if self.metrics is not None:
            chunks = self.metrics.track(chunks)
        first_sent_ns = 0
        async for c in chunks:
            msg = pb.GenerateResponse(request_id=c.request_id, finished=c.finished, model=c.model,
                                      engine_id=c.engine_id or "", prompt_token_ids=c.prompt_token_ids or [])
            if c.prompt_logprobs:
                msg.prompt_logprobs.extend(position_to_pb(e) for e in c.prompt_logprobs)
            for ch in c.choices:
                m = msg.choices.add(index=ch.index, text=ch.text, token_ids=ch.token_ids,
                                    finish_reason=FINISH_TO_PB[ch.finish_reason])
                if ch.logprobs is not None:
                    m.logprobs.extend(position_to_pb(e) for e in ch.logprobs)
                if isinstance(ch.stop_reason, str):
                    m.stop_str = ch.stop_reason
                elif isinstance(ch.stop_reason, int):
                    m.stop_token_id = ch.stop_reason
            if c.usage is not None:
                msg.usage.CopyFrom(common_pb2.Usage(prompt_tokens=c.usage.prompt_tokens,
                                                    completion_tokens=c.usage.completion_tokens,
                                                    cached_tokens=c.usage.cached_tokens))
            if not first_sent_ns and any(ch.token_ids for ch in c.choices):
                first_sent_ns = time.monotonic_ns()
            if c.finished:
                t = c.timing
                msg.timing.CopyFrom(common_pb2.Timing(
                    queue_ns=int((t.get("engine_queue_s") or 0) * 1e9),
                    time_to_first_token_ns=int((t.get("time_to_first_token_s") or 0) * 1e9),
                    total_ns=int((t.get("total_s") or 0) * 1e9)))
                path = [("router.handler", handler_ns), *(t.get("first_token_path") or [])]
                if first_sent_ns:
                    path = [*path, ("router.sent", first_sent_ns)]
                msg.timing.first_token_path.extend(common_pb2.Stamp(hop=h, monotonic_ns=n) for h, n in path)
            yield msg

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelCard(id=m.id, engines=m.engines, max_model_len=m.max_model_len)
                                             for m in self.core.list_models()])

    async def Stats(self, request, context) -> pb.RouterStatsResponse:
        s = self.core.stats()
        r = pb.RouterStatsResponse(redis_ok=s["redis_ok"], requests_in_flight=s["in_flight"], retries=s["retries"],
                                   failovers=s["failovers"], requests_total=s["requests_total"])
        for e in s["engines"]:
            e.fill_pb(r.engines.add())
        return r


class _HttpServer:
    """The OpenAI-compatible HTTP API (services/router/openai/) on this process's event loop, beside
    the gRPC server, sharing its RouterCore. The port is bound before the router reports SERVING, so a
    taken port fails the start loudly; SIGTERM drains it with the gRPC server."""

    def __init__(self, core: RouterCore, metrics: RouterMetrics, c: RouterConfig):
        import socket

        import uvicorn

        from services.router.openai import build_app

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # the gRPC server owns SIGTERM/SIGINT and tells this one to drain
                yield

        # proto IPPROTO_TCP, not the default 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
        # connections whose socket says TCP, and with it on, an event written right after the response's
        # head waited for the client's delayed ACK: ~40 ms (H200 round 1: a few first tokens +43-53 ms).
        self.sock = socket.socket(socket.AF_INET6 if ":" in c.host else socket.AF_INET, socket.SOCK_STREAM,
                                  socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((c.host, c.http_port))
        except OSError as e:
            self.sock.close()
            raise SystemExit(f"router: cannot serve HTTP on {c.host}:{c.http_port}: {e}") from None
        self.sock.listen(2048)
        self.sock.setblocking(False)
        self.grace_s = c.grace_s
        app = build_app(core, api_key=c.api_key, metrics=metrics, tool_call_parser=c.tool_call_parser)
        self.server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=c.grace_s,
                                            access_log=False, ws="none", ssl_certfile=c.tls_cert_file,
                                            ssl_keyfile=c.tls_key_file))
        self.task: asyncio.Task | None = None
        log.info("OpenAI-compatible HTTP API on %s://%s:%d", "https" if c.tls_cert_file else "http", c.host, c.http_port)

    def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="http")

    async def drain(self) -> None:
        self.server.should_exit = True  # stop accepting; requests in flight get up to grace_s

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            try:
                await asyncio.wait_for(self.task, self.grace_s + 1)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
                self.task.cancel()


def warm_then_freeze(structured: bool = True) -> None:
    """Warm structured outputs (unless `structured` is False), then move every object alive by then (the
    modules: grpc, pydantic, torch, xgrammar: ~200k objects) out of the cyclic collector's reach (`gc.freeze`).
    Otherwise each full collection walks them all while serving: ~110-170 ms on the CPU machine, and requests
    in flight wait for it (H200 round 1 of the HTTP front door: a few first tokens +43-53 ms; docs/router.md)."""
    if structured:
        warm_structured_outputs()
    gc.collect()
    gc.freeze()


async def serve(c: RouterConfig) -> None:
    import redis.asyncio as aioredis

    if not c.tokenizer:
        log.warning("no --tokenizer given: only prompt_token_ids requests can be served")
    auth = [ApiKeyInterceptor(c.api_key)] if c.api_key else []
    server = GrpcServer([pb.DESCRIPTOR.services_by_name["Router"].full_name], c.host, c.port, interceptors=auth,
                        tls=_read_tls(c), unix_socket=c.unix_socket)
    redis = aioredis.from_url(c.redis_url, decode_responses=True, socket_timeout=1.0, socket_connect_timeout=1.0)
    busy_loop = c.busy_loop if c.busy_loop is not None else keep_awake.worth_a_core()
    if busy_loop:
        log.info("the event loop polls while requests are in flight (--busy-loop%s)",
                 "" if c.busy_loop else ": this host has the CPUs for it")
    spinners = _spinners(c, busy_loop)
    core = RouterCore.over_grpc(redis, c.tokenizer, c.stale_ms, c.reservation_ttl_ms, max_attempts=c.max_attempts,
                                limits=c.limits, hung_after_s=c.hung_after_s, first_step_s=c.first_step_s,
                                detokenize=c.detokenize, engine_calls_ahead=c.engine_calls_ahead,
                                engine_fast_lane=c.engine_fast_lane,
                                busy_loop=False,  # (below: once the warm-up is done)
                                wake_latency=(cpu_latency.open_request(c.cpu_wake_latency_us)
                                              if c.cpu_wake_latency_us is not None else None))
    metrics = RouterMetrics(core)
    # Validating a constraint imports xgrammar (and torch, ~2.5 s of CPU): do it now on a thread, not on
    # the event loop when the first structured request arrives.
    loop = asyncio.get_running_loop()

    def warm() -> None:
        warm_then_freeze(c.warm_structured)
        if busy_loop:  # polling from now: beside the warm-up, the polling loop would hold the GIL its imports need,
            # stretching them over seconds of requests, each waiting for the GIL behind them (docs/router.md)
            try:
                loop.call_soon_threadsafe(setattr, core, "keep_awake", keep_awake.KeepAwake(spinners=spinners))
            except RuntimeError:  # the loop ended first (a router stopped while it warmed up)
                pass

    threading.Thread(target=warm, name="folio-warm-xgrammar", daemon=True).start()
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(core, metrics), server.server)
    http = _HttpServer(core, metrics, c) if c.http_port is not None else None
    await core.start()

    async def on_ready():
        if http is not None:
            http.start()

    try:
        # Health is SERVING only while a request could be routed (a live engine for every served model).
        await server.run(c.grace_s, on_drain=http.drain if http is not None else None, on_ready=on_ready,
                         ready=core.can_route)
    finally:
        if http is not None:
            await http.stop()
        await core.close()
        await redis.aclose()


def _spinners(c: RouterConfig, busy_loop: bool) -> cpu_spinners.CpuSpinners | None:
    """--poller-cpu / --awake-cpus: grpc.aio's poller thread pinned, and the CPUs kept from halting while the loop
    polls (their spinners are resumed and paused with it)."""
    if c.poller_cpu is None and c.awake_cpus is None:
        return None
    if not busy_loop:
        raise SystemExit("router: --poller-cpu and --awake-cpus go with the polling loop (--busy-loop)")
    try:
        cpus = cpu_affinity.parse_cpus(c.awake_cpus, "--awake-cpus") if c.awake_cpus is not None else set()
        if c.poller_cpu is not None:
            cpus |= cpu_affinity.parse_cpus(str(c.poller_cpu), "--poller-cpu")
    except ValueError as e:
        raise SystemExit(f"router: {e}") from None
    if c.poller_cpu is not None:
        cpu_spinners.pin_grpc_poller(c.poller_cpu)
    return cpu_spinners.CpuSpinners(cpus)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.router", description=__doc__)
    cfg.add_args(parser, RouterConfig, defaults={"redis_url": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")})
    cfg.add_args(parser.add_argument_group("request limits (before any work is done; docs/reliability.md)"),
                 RequestLimits)
    return parser


def _read_tls(c: RouterConfig) -> tuple[bytes, bytes] | None:
    if (c.tls_cert_file is None) != (c.tls_key_file is None):
        raise SystemExit("router: --tls-cert-file and --tls-key-file go together")
    if c.tls_cert_file is None:
        return None
    try:
        return Path(c.tls_cert_file).read_bytes(), Path(c.tls_key_file).read_bytes()
    except OSError as e:
        raise SystemExit(f"router: cannot read the TLS files: {e}") from None


def parse_config(argv: list[str] | None = None) -> RouterConfig:
    ns = build_parser().parse_args(argv)
    c = cfg.from_args(RouterConfig, ns)
    c.limits = cfg.from_args(RequestLimits, ns)
    c.api_key = c.api_key or os.environ.get("FOLIO_API_KEY") or None  # not a flag default: --help must not print it
    c.tokenizer = c.tokenizer or []
    return c


def main(argv: list[str] | None = None) -> int:
    c = parse_config(argv)
    configure_logging(c.log_level)
    if c.cpus is not None:  # before the server's threads start: they inherit it
        try:
            cpu_affinity.pin_process(cpu_affinity.parse_cpus(c.cpus))
        except ValueError as e:
            raise SystemExit(f"router: {e}") from None
    telemetry.setup("folio-router", os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    try:
        asyncio.run(serve(c))
    finally:
        telemetry.shutdown()
    return 0
