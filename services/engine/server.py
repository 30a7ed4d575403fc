"""Engine shard process: one LLMEngine behind the folio.v1.Engine gRPC service, published to Redis."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from protos.gen.folio.v1 import common_pb2, engine_pb2 as pb, engine_pb2_grpc
from services.common import config as cfg, cpu_affinity, cpu_latency, telemetry
from services.common.convert import FINISH_TO_PB, params_from_pb, position_to_pb
from services.common.keep_awake import KeepAwake
from services.common.errors import DeadlineExceeded, InvalidArgument, NotFound, quote
from services.common.model_location import served_name
from services.common.server import GrpcServer, configure_logging
from services.engine.async_engine import FIRST_SENT, AsyncEngine
from services.engine.gil_debug import gil_busy_step
from services.engine.config import SERVED_DEFAULTS, EngineConfig
from services.common.outputs import RequestDelta

log = logging.getLogger("folio.engine.server")


@dataclass
class EngineServerConfig:
    served_model_name: str | None = None
    """Model name clients use (default: the hub id as given, else the model directory's name)."""
    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = 50060
    """gRPC port (0: any free port)."""
    advertise_address: str | None = None
    """The host:port routers dial (default: host:port, or hostname:port when bound to 0.0.0.0)."""
    unix_socket: str | None = None
    """Also listen on this unix domain socket path, and advertise unix:PATH to routers unless an advertise
    address is given: for routers on this host that reach it so (measured no faster than loopback TCP on the
    H200 host; docs/router.md)."""
    engine_id: str | None = None
    """Id in the registry (default: the advertised address)."""
    redis_url: str | None = None
    """Redis for the engine registry (none: do not publish)."""
    heartbeat_interval_s: float = 0.2
    """Seconds between registry reports (sooner on large changes)."""
    heartbeat_ttl_s: float = 2.0
    """Registry entry lifetime: a silent engine leaves routing after this."""
    metrics_port: int | None = None
    """Serve Prometheus metrics (vllm:* names) on this port."""
    grace_s: float = 30.0
    """Seconds in-flight requests get to finish on SIGTERM."""
    step_deadline_s: float = 5.0
    """A step running longer than this is logged (phase, batch size, tokens) while it runs."""
    switch_interval_ms: float | None = None
    """The interpreter's switch interval here (sys.setswitchinterval; None: Python's 5 ms): how long the
    server's event loop may wait for the GIL while the engine thread holds it (docs/router.md; 0.25 ms
    measured on the H200 did not shorten the loop's hops)."""
    first_token_handoff_ms: float = 1.0
    """After a step that produced a request's first token, the engine thread waits up to this long (the GIL
    released) for the event loop to hand the token's message to gRPC before its next step's host work
    (0: no wait; docs/router.md). With asynchronous scheduling the device is busy with the next step meanwhile."""
    core_process: bool = False
    """Run the engine core (the step loop) in a process of its own, so this server's event loop never
    waits for the step thread's GIL (services/engine/core_process.py; docs/router.md)."""
    busy_loop: bool = False
    """With `core_process`: while requests are in flight (and a second after), keep this server's event loop
    polling instead of sleeping, so a request from the router and each message from the core are picked up
    without a thread wake (one core kept busy meanwhile; services/common/keep_awake.py). Not beside a step
    thread in this process, whose GIL a polling loop would take."""
    cpu_wake_latency_us: int | None = None
    """While requests are in flight (and a second after), hold this host's CPU wake-up latency at most this many
    microseconds (Linux PM QoS, /dev/cpu_dma_latency; 0: idle CPUs poll instead of halting, so the thread each
    hop wakes is running at once; the cost is idle CPUs kept busy meanwhile, host-wide). None or -1: never (it
    acts only through the host's cpuidle driver; the H200 VM has none, and there it changed nothing:
    docs/router.md). Needs write access to the file, else it is logged and left (services/common/cpu_latency.py)."""
    cpus: str | None = None
    """Once the engine is loaded, run this process's threads on these CPUs only (a Linux CPU list: '0-13'), e.g.
    to keep them off a router's CPU (services/common/cpu_affinity.py; a --core-process core is not moved). The
    load itself (weights, compiles, CUDA graphs) runs on every CPU. None: any CPU."""
    step_cpus: str | None = None
    """The engine's step thread on these CPUs instead (not with --core-process; with `cpus`, which then holds the
    event loop and the gRPC poller thread: those two wake each other on one CPU, apart from the busy step thread)."""
    fast_lane: bool = True
    """Also serve requests over the fast lane (services/engine/fast_lane.py: one plain socket connection per
    request, read by this server's event loop, the first message written by the step thread), on `host` and
    `fast_lane_port`, named to routers in GenerateStream's initial metadata (routers use it by default:
    docs/router.md). Off where the port cannot be reached or declared (a mesh with strict mTLS); routers then
    use the opened gRPC calls."""
    fast_lane_port: int = 0
    """The fast lane's TCP port (0: any free port). A fixed one can be declared to a service mesh and a firewall
    (deploy/k8s/engine.yaml and docker-compose.yml use 50061)."""
    debug_gil_busy_ms: float = 0.0
    """Debug, for reproducing on CPU: each engine step first spends this many ms in pure Python with a
    tiny torch op every few microseconds, holding the GIL the way a GPU engine's step thread does
    (launching kernels) while the device computes (bench/serving.py, tests/integration/test_hops.py)."""
    log_level: str = "INFO"
    """Logging level."""

    def __post_init__(self):
        if self.cpu_wake_latency_us is not None and self.cpu_wake_latency_us < -1:
            raise ValueError(f"cpu_wake_latency_us: must be >= 0, or -1 for never (got {self.cpu_wake_latency_us})")
        if self.first_token_handoff_ms < 0:
            raise ValueError(f"first_token_handoff_ms: must be >= 0 (got {self.first_token_handoff_ms})")
        if self.busy_loop and not self.core_process:
            raise ValueError("busy_loop: needs core_process (a polling event loop would take the GIL from the "
                             "engine's step thread in this process)")

    def wake_latency_us(self) -> int | None:
        """The CPU wake-up latency this engine holds (`cpu_wake_latency_us`); None: none (an automatic choice by
        device was measured and dropped: docs/router.md)."""
        us = self.cpu_wake_latency_us
        return None if us is None or us < 0 else us


def _ns(t: float | None, since: float | None) -> int:
    return int((t - since) * 1e9) if t is not None and since is not None and t >= since else 0


def _stamp_ns(t: float | None) -> int:
    return int(t * 1e9) if t is not None else 0


class _Progress:
    """What one Generate stream has sent so far."""

    def __init__(self, num_prompt_tokens: int, received_ns: int = 0):
        self.num_prompt_tokens = num_prompt_tokens
        self.received_ns = received_ns
        """When the handler started (time.monotonic_ns()): the first stamp of the first token's path."""
        self.added_ns = 0
        """When add_request returned to the handler (the engine thread had taken the request)."""
        self.got_ns = 0
        """When the handler took the deltas of the message being built off the queue."""
        self.completion_tokens = 0
        self.finish_reasons: dict[int, str] = {}
        self.first = True
        self.finished = False
        self.last_token_time: float | None = None


def delta_message(deltas: list[RequestDelta], prog: _Progress,
                  token_text: Callable[[int], str] | None = None) -> pb.EngineGenerateResponse:
    """The engine's deltas (one, or several a slow reader let pile up) as one message, as they are:
    tokens, logprobs (with each token's text from `token_text`), finish reasons. No text: the router's
    output processor owns it."""
    msg = pb.EngineGenerateResponse()
    by_index: dict[int, pb.SequenceDelta] = {}
    for delta in deltas:
        if delta.prompt_logprobs is not None:
            msg.prompt_logprobs.extend(position_to_pb(e, token_text) for e in delta.prompt_logprobs)
        for d in delta.sequences:
            m = by_index.get(d.index)
            if m is None:
                m = by_index[d.index] = msg.sequences.add(index=d.index)
            m.token_ids.extend(d.token_ids)
            if d.logprobs is not None:
                m.logprobs.extend(position_to_pb(e, token_text) for e in d.logprobs)
            m.cumulative_logprob = d.cumulative_logprob
            if d.finish_reason is not None:
                m.finish_reason = FINISH_TO_PB[d.finish_reason]
                prog.finish_reasons[d.index] = d.finish_reason
                if d.stop_token_id is not None:
                    m.stop_token_id = d.stop_token_id
            prog.completion_tokens += len(d.token_ids)
    last = deltas[-1]
    msg.finished = prog.finished = last.finished
    # Known since admission; on every message, so a caller that ends the stream early (its stop string)
    # still reports it.
    msg.usage.cached_tokens = last.num_cached_tokens
    arrival = last.arrival_time
    if prog.first and msg.sequences:
        prog.first = False
        msg.timing.CopyFrom(common_pb2.Timing(queue_ns=_ns(last.first_scheduled_time, arrival),
                                              time_to_first_token_ns=_ns(last.first_token_time, arrival)))
        first_token_path(msg.timing, prog, last)
    if last.finished:
        msg.usage.CopyFrom(common_pb2.Usage(prompt_tokens=prog.num_prompt_tokens,
                                            completion_tokens=prog.completion_tokens,
                                            cached_tokens=last.num_cached_tokens))
        t = msg.timing  # (fields set one by one: a first message that is also the last keeps its first_token_path)
        t.queue_ns = _ns(last.first_scheduled_time, arrival)
        t.time_to_first_token_ns = _ns(last.first_token_time, arrival)
        t.total_ns = _ns(time.monotonic(), arrival)
    return msg


def first_token_path(timing: common_pb2.Timing, prog: _Progress, last: RequestDelta) -> None:
    """The engine's hops of the first token (docs/router.md): the handler got the request, the engine
    thread admitted it, it was first scheduled, its first token came out of a step, add_request
    returned to the handler, the handler took the token off its queue, and sent it."""
    hops = (("engine.received", prog.received_ns), ("engine.admitted", _stamp_ns(last.arrival_time)),
            ("engine.add_returned", prog.added_ns), ("engine.scheduled", _stamp_ns(last.first_scheduled_time)),
            ("engine.first_token", _stamp_ns(last.first_token_time)), ("engine.dequeued", prog.got_ns),
            ("engine.sent", time.monotonic_ns()))
    timing.first_token_path.extend(common_pb2.Stamp(hop=h, monotonic_ns=t) for h, t in hops if t)


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(self, aengine: AsyncEngine, model_name: str, engine_id: str, metrics=None,
                 keep_awake: KeepAwake | None = None, wake_latency: cpu_latency.CpuWakeLatency | None = None):
        self.aengine = aengine
        self.keep_awake = keep_awake
        """The event loop polls while requests are in flight (`EngineServerConfig.busy_loop`)."""
        self.wake_latency = wake_latency
        """The host's CPUs poll instead of halting while requests are in flight (`cpu_wake_latency_us`)."""
        self.metrics = metrics
        self.engine = aengine.engine
        self.model_name = model_name
        self.engine_id = engine_id
        tok = self.engine.tokenizer
        self.token_text = tok.decode_token if tok is not None else None
        """Each logprob's token text, filled here (off the engine thread) for the wire's decoded_token."""
        self._draining = False
        """Set by `drain`: GenerateStream calls still waiting for their request end."""
        self._waiting: set[asyncio.Task] = set()
        """Handlers of GenerateStream calls waiting for their request."""
        self.opening_metadata: tuple = ()
        """What GenerateStream's initial metadata says (the fast lane's address, when one serves)."""

    async def Generate(self, request: pb.EngineGenerateRequest, context):
        async for msg in self._generate(request, time.monotonic_ns()):
            yield msg

    async def GenerateStream(self, request_iterator, context):
        """Generate over a call the router opened ahead of its request (engine.proto): say at once that
        the call is up, wait for the request (or the drain), then stream as Generate, its deadline
        from `timeout_ms`."""
        await context.send_initial_metadata(self.opening_metadata)
        request = await self._first_request(request_iterator)
        if request is None:  # the opener closed it unused, or this server is draining
            return
        received_ns = time.monotonic_ns()
        deadline = time.monotonic() + request.timeout_ms / 1e3 if request.timeout_ms else None
        async for msg in self._generate(request, received_ns, deadline):
            yield msg

    async def _first_request(self, request_iterator) -> pb.EngineGenerateRequest | None:
        """The call's request, read in the handler's own task (no helper task: each extra wake-up of this
        loop may wait for the GIL the engine thread holds); None when the opener closed the call unused or
        this server drains (`drain` cancels the wait)."""
        if self._draining:
            return None
        task = asyncio.current_task()
        self._waiting.add(task)
        try:
            return await anext(request_iterator, None)
        except asyncio.CancelledError:
            if self._draining and task.cancelling():  # drain() ended the wait: the call ends with no message
                task.uncancel()
                return None
            raise
        finally:
            self._waiting.discard(task)

    def drain(self) -> None:
        """Stop taking requests on opened calls: those still waiting for theirs end with no message."""
        self._draining = True
        for task in list(self._waiting):
            task.cancel()

    async def _generate(self, request: pb.EngineGenerateRequest, received_ns: int, deadline: float | None = None,
                        send_first=None):
        """One request's stream of messages; `deadline` (time.monotonic()): past it, the request is
        aborted and the call ends DEADLINE_EXCEEDED (a call without a gRPC deadline of its own).
        `send_first` (the fast lane's direct first token): an object whose `writable()` says, on the engine
        thread, whether `write(msg)` may send the first message from there; that message is then not yielded."""
        if request.model and request.model != self.model_name:
            raise NotFound(f"model: {quote(request.model)} is not served by this engine (it serves {self.model_name!r})")
        params = params_from_pb(request.params)
        rid = request.request_id or f"engine-{uuid.uuid4().hex}"
        ids = list(request.prompt_token_ids)
        awake = self.keep_awake.hold() if self.keep_awake is not None else contextlib.nullcontext()
        woken = self.wake_latency.hold() if self.wake_latency is not None else contextlib.nullcontext()
        with awake, woken, telemetry.span("folio.engine.generate", **{
                "folio.request_id": rid, "folio.model": self.model_name, "folio.prompt_tokens": len(ids),
                "folio.engine_id": self.engine_id}) as span:
            prog = _Progress(len(ids), received_ns)
            finished = False
            q = None
            timer = None
            sent: list[pb.EngineGenerateResponse] = []  # the first message, when the engine thread sent it
            extra = {}
            if send_first is not None and getattr(self.aengine, "direct_first_token", False):
                extra["first_token"] = functools.partial(self._send_first, send_first, prog, sent)
            try:  # the admission too: a client gone while it was queued must not leave work behind
                q = await self.aengine.add_request(rid, ids, params, **extra)
                prog.added_ns = time.monotonic_ns()
                if deadline is not None:
                    timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()),
                                                                  q.put_nowait, DeadlineExceeded("deadline exceeded"))
                while not finished:
                    deltas = [await q.get()]
                    if deltas[0] is not FIRST_SENT:
                        prog.got_ns = time.monotonic_ns()
                    while not q.empty():  # a slow reader gets what piled up in one message
                        deltas.append(q.get_nowait())
                    if deltas[0] is FIRST_SENT:  # the engine thread sent the first message itself
                        deltas.pop(0)
                        finished = self._after_message(sent.pop(), prog, span)
                        if finished or not deltas:
                            continue
                    failure = next((d for d in deltas if isinstance(d, Exception)), None)
                    if failure is not None:
                        raise failure
                    refused = next((d.error for d in deltas if d.error is not None), None)
                    if refused is not None:  # found only once queued (its grammar): finished, nothing to abort
                        finished = True
                        raise InvalidArgument(refused)
                    msg = delta_message(deltas, prog, self.token_text)
                    finished = self._after_message(msg, prog, span)
                    if msg.sequences or finished:
                        yield msg
            finally:
                if timer is not None:
                    timer.cancel()
                # Cancelled, deadline, or the client went away: free the blocks now. (Gone during the
                # admission itself: add_request queued the abort.)
                if q is not None and not finished:
                    self.aengine.abort(rid)

    def _send_first(self, lane, prog: _Progress, sent: list, delta: RequestDelta) -> bool:
        """On the engine thread: the request's first message, built and written by the fast lane from here
        (no wake-up of this server's event loop on the first token's way), or False (not writable now: the
        loop hands it over as usual). `prog` is the handler's; it waits on its queue meanwhile."""
        if not lane.writable():
            return False
        prog.got_ns = time.monotonic_ns()
        msg = delta_message([delta], prog, self.token_text)
        lane.write(msg)
        sent.append(msg)
        return True

    def _after_message(self, msg: pb.EngineGenerateResponse, prog: _Progress, span) -> bool:
        """Metrics and the span's attributes for a message built; whether it finished the request."""
        if self.metrics is not None:
            self._observe(msg, prog)
        if prog.finished and span.is_recording():
            span.set_attributes({
                "folio.output_tokens": msg.usage.completion_tokens,
                "folio.cached_tokens": msg.usage.cached_tokens,
                "folio.queue_time_ms": msg.timing.queue_ns / 1e6,
                "folio.time_to_first_token_ms": msg.timing.time_to_first_token_ns / 1e6,
                "folio.finish_reason": ",".join(r for _, r in sorted(prog.finish_reasons.items()))})
        return prog.finished

    def _observe(self, msg: pb.EngineGenerateResponse, prog: _Progress) -> None:
        now = time.monotonic()
        n_new = sum(len(d.token_ids) for d in msg.sequences)
        if n_new and prog.last_token_time is not None:
            self.metrics.token_gap(now - prog.last_token_time, n_new)
        if n_new:
            prog.last_token_time = now
        if prog.finished:
            t = msg.timing
            self.metrics.finished(msg.usage.prompt_tokens, msg.usage.completion_tokens, t.queue_ns / 1e9,
                                  t.time_to_first_token_ns / 1e9, t.total_ns / 1e9,
                                  [r for _, r in sorted(prog.finish_reasons.items())])

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        known = request.request_id in self.engine.requests
        self.aengine.abort(request.request_id)
        return pb.AbortResponse(aborted=known)

    async def Stats(self, request, context) -> pb.EngineStatsResponse:
        return self.aengine.snapshot.fill_pb(pb.EngineStatsResponse())

    async def Info(self, request, context) -> pb.EngineInfoResponse:
        e = self.engine
        return pb.EngineInfoResponse(
            model=self.model_name, model_path=str(e.model_dir), max_model_len=e.max_model_len,
            block_size=e.config.block_size, total_blocks=e.blocks.num_blocks, vocab_size=e.vocab_size,
            device=str(e.device), dtype=str(e.dtype).removeprefix("torch."), attention_backend=e.attention_backend,
            engine_id=self.engine_id)


async def _start_fast_lane(servicer: EngineServicer, c: EngineServerConfig, host: str):
    """Serve the fast lane (services/engine/fast_lane.py) and name it in GenerateStream's initial metadata, by the
    host routers dial for gRPC (an advertised name: engine-0 in compose, a pod's IP)."""
    from services.common.fast_lane import METADATA_KEY
    from services.engine.fast_lane import FastLaneServer

    lane = FastLaneServer(servicer)
    port = int((await lane.start(c.host, c.fast_lane_port)).rsplit(":", 1)[1])
    advertised = c.advertise_address
    lane_host = advertised.rsplit(":", 1)[0] if advertised and not advertised.startswith("unix:") else host
    servicer.opening_metadata = ((METADATA_KEY, f"{lane_host}:{port}"),)
    log.info("fast lane at %s:%d", lane_host, port)
    return lane


async def serve(engine_config, c: EngineServerConfig, cpus: set[int] | None = None,
                step_cpus: set[int] | None = None) -> int:
    """Run the engine service until SIGTERM (exit status 0) or until the engine cannot go on (1). `cpus`,
    `step_cpus`: `c.cpus` and `c.step_cpus` parsed (services/common/cpu_affinity.py)."""
    from services.engine.engine import LLMEngine

    server = GrpcServer([pb.DESCRIPTOR.services_by_name["Engine"].full_name], c.host, c.port,
                        unix_socket=c.unix_socket)
    host = c.host if c.host not in ("0.0.0.0", "::", "") else socket.gethostname()
    address = c.advertise_address or server.unix_address or f"{host}:{server.port}"
    engine_id = c.engine_id or address
    if c.debug_gil_busy_ms > 0:
        log.warning("debug: every engine step holds the GIL for %g ms first (debug_gil_busy_ms)", c.debug_gil_busy_ms)
    if c.switch_interval_ms is not None:
        sys.setswitchinterval(c.switch_interval_ms / 1e3)
    publisher = None

    def on_fatal(e: BaseException) -> None:
        log.critical("the engine cannot go on (%s); leaving the registry and exiting", e)
        server.request_stop()

    def on_change(snap) -> None:
        if publisher is not None:
            publisher.notify(snap)

    if c.core_process:
        from services.engine.core_process import CoreProcessEngine

        aengine = CoreProcessEngine(engine_config, on_change=on_change, on_fatal=on_fatal,
                                    debug_gil_busy_ms=c.debug_gil_busy_ms, log_level=c.log_level)
        await aengine.start()
        if cpus is not None:  # (this server's threads; the core process keeps its own)
            cpu_affinity.pin_process(cpus)
        engine = aengine.engine
        # What this server process holds now (grpc, protobuf, the tokenizer) lives as long as it does: keep
        # the cyclic collector's full collections from walking it while requests stream (as the router
        # does; in-thread, LLMEngine freezes the whole process).
        gc.collect()
        gc.freeze()
    else:
        engine = await asyncio.to_thread(LLMEngine, engine_config)
        if cpus is not None:  # loaded: the server's threads move now, the step thread (started below) is placed too
            cpu_affinity.pin_process(cpus)
        if c.debug_gil_busy_ms > 0:
            engine.step = gil_busy_step(engine.step, c.debug_gil_busy_ms)
        aengine = AsyncEngine(engine, on_change=on_change, step_deadline_s=c.step_deadline_s, on_fatal=on_fatal,
                              first_token_handoff_s=c.first_token_handoff_ms / 1e3, step_cpus=step_cpus)
        aengine.start()
    model_name = c.served_model_name or served_name(engine_config.model, engine.model_dir)
    metrics = None
    if c.metrics_port is not None:
        from services.engine.metrics import EngineMetrics

        metrics = EngineMetrics(aengine, model_name)
        metrics.serve(c.host, c.metrics_port)
        log.info("Prometheus metrics on http://%s:%d/metrics", c.host, c.metrics_port)
    keep_awake = KeepAwake() if c.busy_loop else None
    wake_us = c.wake_latency_us()
    woken = cpu_latency.open_request(wake_us) if wake_us is not None else None
    servicer = EngineServicer(aengine, model_name, engine_id, metrics, keep_awake, woken)
    engine_pb2_grpc.add_EngineServicer_to_server(servicer, server.server)
    lane = await _start_fast_lane(servicer, c, host) if c.fast_lane else None
    redis = None
    if c.redis_url:
        import redis.asyncio as aioredis

        from services.engine.publisher import RegistryPublisher

        redis = aioredis.from_url(c.redis_url, decode_responses=True, socket_timeout=1.0, socket_connect_timeout=1.0)
        publisher = RegistryPublisher(redis, aengine, engine_id, address, model_name, engine.max_model_len,
                                      c.heartbeat_interval_s, c.heartbeat_ttl_s)

    async def on_ready():
        if publisher is not None:
            await publisher.publish_once()
            publisher.start()

    async def on_drain():
        servicer.drain()
        if lane is not None:
            lane.drain()
        if publisher is not None:
            await publisher.leave()

    log.info("engine %s serving %s at %s", engine_id, model_name, address)
    try:
        await server.run(c.grace_s, on_drain=on_drain, on_ready=on_ready)
    finally:
        if lane is not None:  # its requests in flight finish within the grace, as gRPC's (unless the engine failed)
            await lane.close(c.grace_s if aengine.fatal is None else 0.0)
        if keep_awake is not None:
            keep_awake.close()
        await aengine.stop()
        if not c.core_process:
            engine.shutdown()  # tensor-parallel workers, if any (the core process stops its own)
        if redis is not None:
            await redis.aclose()
        if woken is not None:
            woken.close()
    return 1 if aengine.fatal is not None else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.engine", description=__doc__)
    cfg.add_args(parser.add_argument_group("engine"), EngineConfig, defaults=SERVED_DEFAULTS)
    cfg.add_args(parser.add_argument_group("server"), EngineServerConfig,
                 defaults={"redis_url": os.environ.get("REDIS_URL")})
    return parser


def parse_config(argv: list[str] | None = None):
    """(EngineConfig, EngineServerConfig) from the command line."""
    ns = build_parser().parse_args(argv)
    return cfg.from_args(EngineConfig, ns), cfg.from_args(EngineServerConfig, ns)


def main(argv: list[str] | None = None) -> int:
    ec, c = parse_config(argv)
    configure_logging(c.log_level)
    try:  # (checked now, applied once the engine is loaded: `serve`)
        if c.step_cpus is not None and c.core_process:
            raise ValueError("step_cpus: the step runs in the core process with --core-process (use --cpus)")
        cpus = cpu_affinity.parse_cpus(c.cpus) if c.cpus is not None else None
        step_cpus = cpu_affinity.parse_cpus(c.step_cpus, "step_cpus") if c.step_cpus is not None else None
    except ValueError as e:
        raise SystemExit(f"engine: {e}") from None
    telemetry.setup("folio-engine", os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    try:
        return asyncio.run(serve(ec, c, cpus, step_cpus))
    finally:
        telemetry.shutdown()
