"""Integration helpers: real processes on loopback (free ports), a real redis-server, the bundled model on CPU.

Every stack started here is stopped in teardown (SIGTERM, then SIGKILL), and children die with the
test process anyway (PR_SET_PDEATHSIG). KV pools are small and outputs short so the suite stays quick
on a 2-core machine; engines run one OpenMP thread each (several share the cores).
"""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from protos.generate import ensure_generated

ensure_generated()

from folio.stack import Stack, StackConfig  # noqa: E402
from protos.gen.folio.v1 import (  # noqa: E402
    common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc,
)

# Small pools: 64 blocks x 16 tokens per engine (~47 MB of fp32 KV for SmolLM2-135M).
SMALL_ENGINE = ["--num-kv-blocks", "64", "--max-model-len", "1024", "--dtype", "float32", "--device", "cpu"]
TEST_ENV = {"OMP_NUM_THREADS": "1"}


def start_stack(tmp_path_factory, name: str, warm_structured: bool = False, **kw) -> Stack:
    """A stack of real processes (stopped by the caller). Its router skips the structured-output warm-up (~3 s
    of CPU per router, taken from the engines starting beside it on a 2-core machine) unless `warm_structured`
    (the stacks that serve structured outputs: the first such request would pay it otherwise)."""
    kw.setdefault("engine_args", SMALL_ENGINE)
    kw.setdefault("router_port", 0)
    if not warm_structured:
        kw["router_args"] = [*kw.get("router_args", []), "--no-warm-structured"]
    kw["env"] = {**TEST_ENV, **kw.get("env", {})}
    return Stack(StackConfig(log_dir=tmp_path_factory.mktemp(name), **kw)).start()


def start_engine_only(tmp_path_factory, name: str, engine_args: list[str]) -> Stack:
    """Redis and one engine publishing to it, no tokenizer or router: for tests that call the engine directly
    (stopped by the caller; its address is `engine_addresses[0]`)."""
    s = Stack(StackConfig(log_dir=tmp_path_factory.mktemp(name), engine_args=engine_args, env=dict(TEST_ENV)))
    try:
        s.redis_url = s.start_redis()
        s.wait_serving([s.start_engine(0)])
    except BaseException:
        s.stop()
        raise
    return s


def params(**kw) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**kw)


def router_stub(address: str) -> tuple[grpc.Channel, router_pb2_grpc.RouterStub]:
    ch = grpc.insecure_channel(address)
    return ch, router_pb2_grpc.RouterStub(ch)


def engine_stub(address: str) -> tuple[grpc.Channel, engine_pb2_grpc.EngineStub]:
    ch = grpc.insecure_channel(address)
    return ch, engine_pb2_grpc.EngineStub(ch)


class Result:
    """Everything a router stream returned, accumulated per sequence."""

    def __init__(self):
        self.text: dict[int, str] = {}
        self.token_ids: dict[int, list[int]] = {}
        self.logprobs: dict[int, list] = {}
        self.finish: dict[int, int] = {}
        self.stop_str: dict[int, str] = {}
        self.messages: list[router_pb2.GenerateResponse] = []
        self.engine_ids: list[str] = []
        self.usage = None
        self.error: grpc.RpcError | None = None

    def add(self, m: router_pb2.GenerateResponse) -> None:
        self.messages.append(m)
        if m.engine_id:
            self.engine_ids.append(m.engine_id)
        for c in m.choices:
            self.text[c.index] = self.text.get(c.index, "") + c.text
            self.token_ids.setdefault(c.index, []).extend(c.token_ids)
            self.logprobs.setdefault(c.index, []).extend(c.logprobs)
            if c.finish_reason:
                self.finish[c.index] = c.finish_reason
                self.stop_str[c.index] = c.stop_str
        if m.finished:
            self.usage = m.usage


def generate(address: str, timeout: float = 120, **req) -> Result:
    ch, stub = router_stub(address)
    r = Result()
    try:
        for m in stub.Generate(router_pb2.GenerateRequest(**req), timeout=timeout):
            r.add(m)
    finally:
        ch.close()
    return r


def generate_in_thread(address: str, **req) -> tuple[threading.Thread, Result]:
    r = Result()

    def run():
        ch, stub = router_stub(address)
        try:
            for m in stub.Generate(router_pb2.GenerateRequest(**req), timeout=300):
                r.add(m)
        except grpc.RpcError as e:
            r.error = e
        finally:
            ch.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, r


def engine_stats(address: str) -> engine_pb2.EngineStatsResponse:
    ch, stub = engine_stub(address)
    try:
        return stub.Stats(engine_pb2.EngineStatsRequest(), timeout=5)
    finally:
        ch.close()


def wait_for(pred, timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def random_prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


def redis_client(stack: Stack):
    import redis

    return redis.Redis.from_url(stack.redis_url, decode_responses=True)


def wait_health_status(address: str, timeout_s: float = 60.0) -> int:
    """Wait until the gRPC health service at `address` answers; return its status (SERVING or not)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                return stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{address}: no health answer within {timeout_s:.0f}s") from None
                time.sleep(0.1)
