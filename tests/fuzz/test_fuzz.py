"""Fuzz suite (must-show 1): ~2,200 generated hostile requests over HTTP and gRPC against a real stack
(router with HTTP, tokenizer, two engines). No 5xx, no INTERNAL/UNKNOWN/UNAVAILABLE, no hang, no process
death; router and tokenizer memory within RSS_BOUND_MB of before; afterwards every engine reports 0
running and 0 waiting within a few seconds. Examples are derandomized (the same every run); each answer is
checked as it comes (tests/fuzz/fuzzing.py) and the failures are reported together at the end of a test.
The tests run in file order: warm-up and memory baseline first, the stack's health last."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from protos.gen.folio.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.fuzz import fuzzing as fz
from tests.integration.helpers import engine_stats, start_stack, wait_for

pytestmark = pytest.mark.timeout(600)

RSS_BOUND_MB = 40.0
"""How much the router's and the tokenizer's resident memory may grow over the run (after warm-up)."""
BODY_LIMIT = 1 << 20
CONCURRENCY = 8
"""Requests in flight at once (hypothesis draws the next while they run; the engines batch them)."""
FUZZ = dict(deadline=None, derandomize=True, database=None, phases=[Phase.generate],
            suppress_health_check=list(HealthCheck))


class _Run:
    def __init__(self, stack):
        self.stack = stack
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}")
        self.channel = grpc.insecure_channel(stack.router_address)
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.tally = fz.Tally()
        self.rss_before: dict[str, float] = {}

    def pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self.stack.procs if p.name in ("router", "tokenizer")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    port = __import__("folio.stack", fromlist=["free_port"]).free_port()
    stack = start_stack(tmp_path_factory, "fuzz", engines=2, http_port=port, warm_structured=True,
                        engine_args=["--num-kv-blocks", "64", "--max-model-len", "256", "--dtype", "float32",
                                     "--max-num-seqs", "16"],
                        router_args=["--max-body-bytes", str(BODY_LIMIT)])
    stack.http_port = port
    r = _Run(stack)
    yield r
    r.http.close()
    r.channel.close()
    stack.stop()


class _Sender:
    """Sends each generated request from a pool of CONCURRENCY threads; `wait()` at the end of a test."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(CONCURRENCY)
        self.futures = []

    def __call__(self, fn, *args, **kw) -> None:
        self.futures.append(self.pool.submit(fn, *args, **kw))

    def wait(self) -> None:
        self.pool.shutdown(wait=True)
        for f in self.futures:
            f.result()  # a bug in the fuzzer itself, not an answer: raise it


def _check(tally: fz.Tally, since: int) -> None:
    new = tally.failures[since:]
    assert not new, f"{len(new)} bad answers, first ones:\n" + "\n".join(new[:10])


def test_warm_up_and_memory_baseline(run):
    """A few requests of each kind first, so the baseline counts what any serving process holds."""
    for i in range(8):
        fz.post_http(run.http, run.tally, "/v1/completions", fz.dumps({"prompt": f"Hi {i}", "max_tokens": 2}), "warm")
        fz.post_http(run.http, run.tally, "/v1/chat/completions",
                     fz.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "n": 2}), "warm")
        fz.call_grpc(run.stub, run.tally, router_pb2.GenerateRequest(
            text="Hello", params=common_pb2.SamplingParams(max_tokens=2)), kind="warm")
    _check(run.tally, 0)
    assert run.tally.counts["warm:200"] == 16 and run.tally.counts["warm:OK"] == 8
    run.rss_before = {name: fz.rss_mb(pid) for name, pid in run.pids().items()}


def test_http_completions_fuzz(run):
    since = len(run.tally.failures)

    send = _Sender()

    @settings(max_examples=480, **FUZZ)
    @given(fz.completion_body())
    def one(body):
        send(fz.post_http, run.http, run.tally, "/v1/completions", fz.dumps(body), "completions")

    one()
    send.wait()
    _check(run.tally, since)


def test_http_chat_fuzz(run):
    since = len(run.tally.failures)

    send = _Sender()

    @settings(max_examples=330, **FUZZ)
    @given(fz.chat_body())
    def one(body):
        send(fz.post_http, run.http, run.tally, "/v1/chat/completions", fz.dumps(body), "chat")

    one()
    send.wait()
    _check(run.tally, since)


def test_http_garbage_and_oversized_bodies(run):
    since = len(run.tally.failures)

    @settings(max_examples=300, **FUZZ)
    @given(fz.RAW_BODIES, st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
           st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]))
    def one(body, path, ctype):
        fz.post_http(run.http, run.tally, path, body, "garbage", headers={"content-type": ctype})

    one()
    for path in ("/v1/completions", "/v1/chat/completions"):  # 413 from Content-Length, then chunked
        assert fz.post_http(run.http, run.tally, path, fz.oversized_body(BODY_LIMIT), "oversized") == 413

        def chunks():
            yield b'{"prompt": "'
            for _ in range((BODY_LIMIT >> 16) + 2):
                yield b"x" * (1 << 16)
            yield b'"}'
        r = run.http.post(path, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
        run.tally.add("oversized-chunked", r.status_code, 0.0, None if r.status_code == 413 else r.text[:200])
    _check(run.tally, since)


def test_openai_client_requests(run):
    """Sane-looking requests through the official client (no retries: a 5xx would show)."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{run.stack.http_port}/v1", api_key="unused", max_retries=0,
                           timeout=fz.HTTP_TIMEOUT_S)
    since = len(run.tally.failures)

    @settings(max_examples=30, **FUZZ)
    @given(st.sampled_from(["completion", "chat", "chat-stream"]), fz.TEXT, st.integers(1, 3), st.integers(1, 3),
           st.one_of(st.none(), st.floats(0, 2)), st.one_of(st.none(), fz.WORDS, st.lists(fz.WORDS, max_size=3)))
    def one(kind, text, n, max_tokens, temperature, stop):
        t0 = time.monotonic()
        try:
            if kind == "completion":
                out = client.completions.create(model=None or "", prompt=text or "x", n=n, max_tokens=max_tokens,
                                                temperature=temperature, stop=stop)
                ok = len(out.choices) == n
            elif kind == "chat":
                out = client.chat.completions.create(model="", messages=[{"role": "user", "content": text}], n=n,
                                                     max_tokens=max_tokens, temperature=temperature, stop=stop)
                ok = len(out.choices) == n and all(c.finish_reason in ("stop", "length") for c in out.choices)
            else:
                events = list(client.chat.completions.create(model="", messages=[{"role": "user", "content": text}],
                                                             n=n, max_tokens=max_tokens, stream=True, stop=stop))
                ok = {c.index for e in events for c in e.choices if c.finish_reason} == set(range(n))
            run.tally.add(f"openai-{kind}", "ok" if ok else "wrong", time.monotonic() - t0,
                          None if ok else f"unexpected answer to {text!r} n={n}")
        except openai.BadRequestError as e:
            run.tally.add(f"openai-{kind}", 400, time.monotonic() - t0)  # e.g. an empty model name
            assert e.status_code == 400
        except openai.APIError as e:
            run.tally.add(f"openai-{kind}", "error", time.monotonic() - t0, f"{type(e).__name__}: {e}"[:300])

    one()
    _check(run.tally, since)


def test_grpc_generate_fuzz(run):
    since = len(run.tally.failures)

    send = _Sender()

    @settings(max_examples=520, **FUZZ)
    @given(fz.grpc_request())
    def one(req):
        send(fz.call_grpc, run.stub, run.tally, req)

    one()
    send.wait()
    _check(run.tally, since)


def test_grpc_undecodable_bytes(run):
    since = len(run.tally.failures)

    @settings(max_examples=350, **FUZZ)
    @given(st.one_of(st.binary(max_size=64), st.just(b"\xff" * 20), st.just(b"\x0a\xff\xff\xff\xff\x0f"),
                     st.just(b"\x12\x04\xff\xfe\xfd\xfc")))
    def one(payload):
        fz.call_raw_grpc(run.channel, run.tally, payload)

    one()
    _check(run.tally, since)


def test_stack_is_whole_afterwards(run):
    """No process died, engines drop every request of clients that are gone, memory stayed bounded."""
    dead = [p.name for p in run.stack.procs if p.popen.poll() is not None]
    assert not dead, f"processes died: {dead}"
    t0 = time.monotonic()
    for addr in run.stack.engine_addresses:
        try:
            wait_for(lambda: (s := engine_stats(addr)).running + s.waiting == 0, timeout=10, interval=0.1,
                     what=f"engine {addr} to hold no request")
        except AssertionError:
            stats = run.stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
            raise AssertionError(f"engine {addr} still holds {engine_stats(addr).running} running, "
                                 f"{engine_stats(addr).waiting} waiting; router in flight: "
                                 f"{stats.requests_in_flight}") from None
    idle_after = time.monotonic() - t0
    after = {name: fz.rss_mb(pid) for name, pid in run.pids().items()}
    growth = {name: after[name] - run.rss_before[name] for name in after}
    print(f"\nfuzz: {run.tally.total} requests, slowest answer {run.tally.slowest_s:.2f}s, engines idle "
          f"{idle_after:.1f}s after; RSS before {run.rss_before}, after {after} (MB)")
    print("fuzz answers:", dict(sorted(run.tally.counts.items())))
    assert all(g <= RSS_BOUND_MB for g in growth.values()), f"RSS grew more than {RSS_BOUND_MB} MB: {growth}"
    assert run.tally.total >= 2000
    assert idle_after < 5.0
    ok = router_pb2.GenerateRequest(text="Hello", params=common_pb2.SamplingParams(max_tokens=2))
    assert fz.call_grpc(run.stub, run.tally, ok) == grpc.StatusCode.OK  # and it still serves


def test_clients_that_leave_early_leave_no_engine_work(run):
    """Runs last: 40 HTTP clients that disconnect mid-request (before the first byte or mid-stream) and 40
    gRPC requests with deadlines of 20-140 ms, back to back. The answers must be clean, and every engine
    must hold nothing within 10 s (no work for clients that are gone; 5 s was once too short on a 2-core host
    at load 5)."""
    since = len(run.tally.failures)
    for i in range(40):
        try:
            with run.http.stream("POST", "/v1/completions", timeout=httpx.Timeout(10, read=0.05 + 0.05 * (i % 4)),
                                 json={"prompt": f"Story {i}", "max_tokens": 64, "stream": i % 2 == 0,
                                       "ignore_eos": True, "n": 1 + i % 2}) as r:
                for _ in r.iter_bytes():
                    pass
            run.tally.add("http-leave", r.status_code, 0.0, None if r.status_code < 500 else f"{r.status_code}")
        except httpx.TimeoutException:
            run.tally.add("http-leave", "left", 0.0)
        req = router_pb2.GenerateRequest(text=f"Tell me a story {i}", params=common_pb2.SamplingParams(
            max_tokens=64, ignore_eos=True, n=1 + i % 3))
        fz.call_grpc(run.stub, run.tally, req, timeout_s=0.02 + 0.03 * (i % 5), kind="grpc-deadline")
    _check(run.tally, since)  # the answers themselves are fine (a disconnect, DEADLINE_EXCEEDED)
    for addr in run.stack.engine_addresses:
        t0 = time.monotonic()
        while (s := engine_stats(addr)).running + s.waiting and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert s.running + s.waiting == 0, (f"engine {addr} still holds {s.running} running and {s.waiting} "
                                            f"waiting requests of clients that left, 10 s after the last")
