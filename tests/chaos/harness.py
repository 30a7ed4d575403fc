"""Chaos harness: streaming load against a real 2-engine stack while processes are killed, frozen and restarted.

Every request is greedy (temperature 0, ignore_eos) on one of a few fixed prompts, so its exact text is
known from the offline reference. Each ends as one of: `exact` (the reference text), `wrong` (finished,
other text), `retryable` (a clean UNAVAILABLE / RESOURCE_EXHAUSTED / ABORTED the client may retry),
`error` (any other status), `lost` (the stream ended without finishing), `hung` (no end within the
client's deadline). Clients alternate between the router replicas given. Used by tests/chaos and
bench/chaos.py (the long run).
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import grpc

from folio.stack import Proc, Stack, free_port
from protos.gen.folio.v1 import common_pb2, router_pb2, router_pb2_grpc

PROMPTS = [f"Write one sentence about a {w}." for w in ("cat", "river", "mountain", "robot", "garden", "ship")]
MAX_TOKENS = 12
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}


def reference(llm) -> dict[str, str]:
    from folio import SamplingParams

    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, outs)}


@dataclass
class Tally:
    counts: collections.Counter = field(default_factory=collections.Counter)
    details: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, took: float, detail: str | None = None) -> None:
        with self.lock:
            self.counts[kind] += 1
            self.slowest_s = max(self.slowest_s, took)
            if detail and len(self.details) < 50:
                self.details.append(f"{kind}: {detail}")


class Load:
    """`workers` threads streaming requests, one at a time each, until stop()."""

    def __init__(self, routers: list[str], expected: dict[str, str], workers: int = 4, deadline_s: float = 60.0):
        self.routers, self.expected, self.deadline_s = routers, expected, deadline_s
        self.tally = Tally()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(workers)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.deadline_s + 10)

    def _work(self, i: int) -> None:
        k = 0
        while not self._stop.is_set():
            router = self.routers[(i + k) % len(self.routers)]
            self.one(router, PROMPTS[(i + k) % len(PROMPTS)])
            k += 1

    def one(self, router: str, prompt: str) -> None:
        t0 = time.monotonic()
        text, finished = "", False
        req = router_pb2.GenerateRequest(text=prompt, params=common_pb2.SamplingParams(
            temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        with grpc.insecure_channel(router) as ch:
            try:
                for m in router_pb2_grpc.RouterStub(ch).Generate(req, timeout=self.deadline_s):
                    text += "".join(c.text for c in m.choices)
                    finished = finished or m.finished
            except grpc.RpcError as e:
                code = e.code()
                kind = ("hung" if code == grpc.StatusCode.DEADLINE_EXCEEDED
                        else "retryable" if code in RETRYABLE else "error")
                self.tally.add(kind, time.monotonic() - t0, f"{code.name} {e.details()}")
                if kind == "retryable":
                    time.sleep(0.2)  # as a client backs off
                return
        took = time.monotonic() - t0
        if not finished:
            self.tally.add("lost", took, repr(text))
        elif text == self.expected[prompt]:
            self.tally.add("exact", took)
        else:
            self.tally.add("wrong", took, f"{prompt!r}: {text!r} != {self.expected[prompt]!r}")


def add_router(stack: Stack) -> Proc:
    """A second router replica on its own port, beside the stack's (same tokenizer, same Redis)."""
    first = next(p for p in stack.procs if p.name == "router")
    argv = list(first.argv)
    port = free_port(stack.c.host)
    argv[argv.index("--port") + 1] = str(port)
    if "--http-port" in argv:
        argv[argv.index("--http-port") + 1] = str(free_port(stack.c.host))
    log = stack.log_dir / "router2.log"
    p = Proc("router2", Stack._popen(argv, log, first.env), f"{stack.c.host}:{port}", log, argv, first.env)
    stack.procs.append(p)
    stack.wait_serving([p])
    return p


def proc(stack: Stack, name: str) -> Proc:
    return next(p for p in stack.procs if p.name == name)


def kill_and_respawn(stack: Stack, name: str, down_s: float = 1.0) -> None:
    """SIGKILL a child, leave it down `down_s`, start it again on the same port, wait until it serves."""
    p = proc(stack, name)
    p.popen.send_signal(signal.SIGKILL)
    p.popen.wait(10)
    time.sleep(down_s)
    stack.respawn(p)
    if name != "redis":
        stack.wait_serving([p])


def freeze(stack: Stack, name: str, for_s: float) -> None:
    p = proc(stack, name)
    os.kill(p.popen.pid, signal.SIGSTOP)
    try:
        time.sleep(for_s)
    finally:
        os.kill(p.popen.pid, signal.SIGCONT)


FAULTS = {
    "engine-sigkill": lambda s: kill_and_respawn(s, "engine0"),
    "engine-sigstop": lambda s: freeze(s, "engine1", 20.0),
    "redis-restart": lambda s: kill_and_respawn(s, "redis"),
    "tokenizer-restart": lambda s: kill_and_respawn(s, "tokenizer"),
    "router-restart": lambda s: kill_and_respawn(s, "router"),
}
