"""Router process: the folio.v1.Router gRPC service over RouterCore (and, when asked, the HTTP API)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import dataclass

from protos.gen.folio.v1 import common_pb2, router_pb2 as pb, router_pb2_grpc
from services.common import config as cfg, telemetry
from services.common.convert import FINISH_TO_PB, params_from_pb, position_to_pb
from services.common.errors import InvalidArgument
from services.common.server import GrpcServer, configure_logging
from services.router.core import GenerateInput, RouterCore

log = logging.getLogger("folio.router.server")


@dataclass
class RouterConfig:
    host: str = cfg.field("127.0.0.1", "address to bind")
    port: int = cfg.field(50051, "gRPC port (0: any free port)")
    tokenizer: list[str] = cfg.field([], "tokenizer service address host:port, one per model")
    redis_url: str = cfg.field("redis://127.0.0.1:6379/0", "Redis holding the engine registry")
    stale_ms: int = cfg.field(1500, "engines whose last report is older than this are not chosen")
    reservation_ttl_ms: int = cfg.field(10_000, "a block reservation the engine never confirms is dropped after this")
    max_attempts: int = cfg.field(3, "engines tried per request (failures before the first token, failovers after)")
    http_port: int | None = cfg.field(None, "also serve the OpenAI-compatible HTTP API on this port (services.router.http)")
    grace_s: float = cfg.field(30.0, "seconds in-flight requests get to finish on SIGTERM")
    log_level: str = cfg.field("INFO", "logging level")


def request_from_pb(r: pb.GenerateRequest, timeout_s: float | None) -> GenerateInput:
    which = r.WhichOneof("prompt")
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
    def __init__(self, core: RouterCore):
        self.core = core

    async def Generate(self, request: pb.GenerateRequest, context):
        inp = request_from_pb(request, context.time_remaining())
        async for c in self.core.generate(inp):
            msg = pb.GenerateResponse(request_id=c.request_id, finished=c.finished, model=c.model,
                                      engine_id=c.engine_id or "", prompt_token_ids=c.prompt_token_ids or [])
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
            if c.finished:
                t = c.timing
                msg.timing.CopyFrom(common_pb2.Timing(
                    queue_ns=int((t.get("engine_queue_s") or 0) * 1e9),
                    time_to_first_token_ns=int((t.get("time_to_first_token_s") or 0) * 1e9),
                    total_ns=int((t.get("total_s") or 0) * 1e9)))
            yield msg

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelCard(id=m.id, engines=m.engines, max_model_len=m.max_model_len)
                                             for m in self.core.list_models()])

    async def Stats(self, request, context) -> pb.RouterStatsResponse:
        s = self.core.stats()
        r = pb.RouterStatsResponse(redis_ok=s["redis_ok"], requests_in_flight=s["in_flight"], retries=s["retries"],
                                   failovers=s["failovers"], requests_total=s["requests_total"])
        for e in s["engines"]:
            r.engines.add(engine_id=e.engine_id, address=e.address, model=e.model, total_blocks=e.total_blocks,
                          free_blocks=e.free_blocks, evictable_blocks=e.evictable_blocks,
                          waiting_blocks=e.waiting_blocks, running=e.running, waiting=e.waiting,
                          reserved_blocks=e.reserved_blocks)
        return r


async def _serve_http(core: RouterCore, c: RouterConfig) -> asyncio.Task | None:
    """The hook for the OpenAI-compatible HTTP API (issue 5): services.router.http.build_app(core)."""
    if c.http_port is None:
        return None
    try:
        from services.router import http
    except ImportError:
        log.error("--http-port %d given but the HTTP API (services.router.http) is not built yet", c.http_port)
        return None
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(http.build_app(core), host=c.host, port=c.http_port, log_level="warning"))
    server.install_signal_handlers = lambda: None  # the gRPC server owns SIGTERM/SIGINT
    return asyncio.create_task(server.serve(), name="http")


async def serve(c: RouterConfig) -> None:
    import redis.asyncio as aioredis

    if not c.tokenizer:
        log.warning("no --tokenizer given: only prompt_token_ids requests can be served")
    server = GrpcServer([pb.DESCRIPTOR.services_by_name["Router"].full_name], c.host, c.port)
    redis = aioredis.from_url(c.redis_url, decode_responses=True, socket_timeout=1.0, socket_connect_timeout=1.0)
    core = RouterCore(redis, c.tokenizer, c.stale_ms, c.reservation_ttl_ms, max_attempts=c.max_attempts)
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(core), server.server)
    await core.start()
    http_task = await _serve_http(core, c)
    try:
        await server.run(c.grace_s)
    finally:
        if http_task is not None:
            http_task.cancel()
        await core.close()
        await redis.aclose()


def parse_config(argv: list[str] | None = None) -> RouterConfig:
    parser = argparse.ArgumentParser(prog="python -m services.router", description=__doc__)
    cfg.add_args(parser, RouterConfig, defaults={"redis_url": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")})
    c = cfg.from_args(RouterConfig, parser.parse_args(argv))
    c.tokenizer = c.tokenizer or []
    return c


def main(argv: list[str] | None = None) -> int:
    c = parse_config(argv)
    configure_logging(c.log_level)
    telemetry.setup("folio-router", os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    try:
        asyncio.run(serve(c))
    finally:
        telemetry.shutdown()
    return 0
