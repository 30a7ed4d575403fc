"""Hostile-request generation (hypothesis strategies) and the checks each answer must pass, for the fuzz
suite (tests/fuzz/test_fuzz.py, bounded for `make test`) and its long variant (bench/fuzz.py).

A request is fine when its answer is: HTTP below 500 (a 400/404/413/429 naming what was wrong, or a
200); gRPC OK or a client-side status (INVALID_ARGUMENT, NOT_FOUND, OUT_OF_RANGE, RESOURCE_EXHAUSTED,
DEADLINE_EXCEEDED for a deadline the fuzzer set itself), never INTERNAL, UNKNOWN or UNAVAILABLE from a
healthy stack; always within the client's timeout (no hang). Most requests are refusals (cheap); the
valid ones generate at most a few tokens, so the suite is quick on two cores.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import httpx
from hypothesis import strategies as st

from protos.gen.folio.v1 import common_pb2, router_pb2

HTTP_TIMEOUT_S = 30.0
GRPC_TIMEOUT_S = 30.0
GRPC_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}

# --- values ----------------------------------------------------------------------------------------
HUGE_INTS = st.sampled_from([2**31, 2**32, 2**32 + 1, 2**53, 2**63, 2**64, 10**30, -1, -(2**63), 0])
BAD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0])
WORDS = st.sampled_from(["Hi", "Hello", "The", "a", "1 2 3", "\u00e9t\u00e9", "\u4f60\u597d", "\U0001f600",
                         "\x00", "<|im_end|>", "<|im_start|>", "\ufffd", " "])
TEXT = st.one_of(WORDS, st.text(max_size=12), st.lists(WORDS, max_size=6).map(" ".join))
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                     max_size=3), max_leaves=8)


def some(strategy, *extra):
    """A sane value or a hostile one (huge, NaN, wrong type)."""
    return st.one_of(strategy, *extra, HUGE_INTS, BAD_FLOATS, JSONISH)


SANE = st.integers(0, 9).map(lambda k: k < 2)
"""About 20% of generated bodies use sane values only (so that they are served, not refused)."""
SMALL_MAX_TOKENS = st.integers(1, 3)
MAX_TOKENS = st.one_of(SMALL_MAX_TOKENS, SMALL_MAX_TOKENS, SMALL_MAX_TOKENS, HUGE_INTS, BAD_FLOATS,
                       st.text(max_size=3), st.lists(st.integers(), max_size=2))
"""Never null: a request without max_tokens is valid and generates to the context's end (slow on CPU)."""
TOKEN_IDS = st.lists(st.one_of(st.integers(0, 49151), HUGE_INTS), min_size=0, max_size=8)
SANE_TOKEN_IDS = st.lists(st.integers(0, 49151), min_size=1, max_size=8)
STOP = st.one_of(st.none(), WORDS, st.lists(WORDS, max_size=4), st.lists(st.just("x"), min_size=17, max_size=40),
                 st.just(["y" * 5000]), JSONISH)
SANE_STOP = st.one_of(st.none(), WORDS, st.lists(WORDS, max_size=3))
N = st.one_of(st.integers(1, 3), st.integers(1, 3), st.sampled_from([0, -1, 129, 2**31, 2**32, 4294967296, 10**12]),
              JSONISH)
_SAMPLING = [  # (field, sane values, hostile values)
    ("temperature", st.floats(0, 2), BAD_FLOATS), ("top_p", st.floats(0.01, 1), BAD_FLOATS),
    ("top_k", st.integers(-1, 50).filter(bool), HUGE_INTS), ("min_p", st.floats(0, 1), BAD_FLOATS),
    ("seed", st.integers(0, 2**31), HUGE_INTS), ("stop", SANE_STOP, STOP),
    ("presence_penalty", st.floats(-2, 2), BAD_FLOATS), ("frequency_penalty", st.floats(-2, 2), BAD_FLOATS),
    ("repetition_penalty", st.floats(0.5, 2), BAD_FLOATS), ("min_tokens", st.integers(0, 1), HUGE_INTS),
    ("stop_token_ids", st.lists(st.integers(0, 49151), max_size=3), st.just(list(range(2000)))),
    ("ignore_eos", st.booleans(), JSONISH), ("logit_bias", st.none(), JSONISH), ("user", st.text(max_size=8), JSONISH),
    ("skip_special_tokens", st.booleans(), JSONISH)]


def _fields(draw, sane: bool, fields, odds: int) -> dict:
    """Each field present one time in `odds`; a hostile body's values are sane or hostile."""
    body = {}
    for name, good, bad in fields:
        if draw(st.integers(0, odds - 1)) == 0:
            body[name] = draw(good if sane else some(good, bad))
    return body


@st.composite
def completion_body(draw) -> dict:
    sane = draw(SANE)
    if sane:
        prompt = draw(st.one_of(TEXT.filter(bool), st.lists(TEXT.filter(bool), min_size=1, max_size=2),
                                SANE_TOKEN_IDS))
        body = {"prompt": prompt, "max_tokens": draw(st.integers(1, 2))}
    else:
        prompt = draw(st.one_of(TEXT, TEXT, st.lists(TEXT, max_size=4), TOKEN_IDS, st.lists(TOKEN_IDS, max_size=3),
                                st.just(["a"] * 300), st.just(""), st.just([]), JSONISH))
        body = {"prompt": prompt, "max_tokens": draw(MAX_TOKENS)}
    body.update(_fields(draw, sane, _SAMPLING, 6))
    body.update(_fields(draw, sane, [
        ("n", st.integers(1, 2), N), ("best_of", st.none(), N), ("logprobs", st.integers(0, 3), st.just(21)),
        ("echo", st.booleans(), JSONISH), ("stream", st.booleans(), JSONISH), ("suffix", st.none(), TEXT),
        ("stream_options", st.none(), st.one_of(st.just({"include_usage": True}), JSONISH)),
        ("model", st.none(), st.one_of(st.text(max_size=10), st.just("x" * 20000), JSONISH))], 4))
    if body.get("stream") is True and draw(st.booleans()):
        body["stream_options"] = {"include_usage": True}
    return body


MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), st.text(max_size=5), JSONISH),
     "content": st.one_of(TEXT, st.none(), st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]),
                                                                          "text": TEXT}), max_size=3),
                          st.just([{"type": "text", "text": "a"}] * 2000), JSONISH)})


@st.composite
def chat_body(draw) -> dict:
    sane = draw(SANE)
    if sane:
        messages = [{"role": r, "content": c} for r, c in draw(st.lists(
            st.tuples(st.sampled_from(["user", "system", "assistant"]), TEXT), min_size=1, max_size=3))]
        body = {"messages": messages, "max_tokens": draw(st.integers(1, 2))}
    else:
        messages = draw(st.one_of(st.lists(MESSAGE, min_size=1, max_size=3), st.lists(MESSAGE, max_size=3),
                                  st.just([{"role": "user", "content": "x"}] * 5000), JSONISH))
        body = {"messages": messages, "max_tokens": draw(MAX_TOKENS)}
    body.update(_fields(draw, sane, _SAMPLING, 6))
    body.update(_fields(draw, sane, [
        ("n", st.integers(1, 2), N), ("logprobs", st.booleans(), JSONISH), ("stream", st.booleans(), JSONISH),
        ("top_logprobs", st.none(), st.integers(0, 50)), ("max_completion_tokens", st.none(), MAX_TOKENS),
        ("tools", st.none(), JSONISH), ("response_format", st.none(), JSONISH)], 4))
    return body


RAW_BODIES = st.one_of(
    st.binary(max_size=64), st.just(b"{"), st.just(b"null"), st.just(b"[]"), st.just(b'{"prompt": NaN, "n": 1e999}'),
    st.just(b'{"prompt": "\xff\xfe"}'), st.just(b"[" * 100_000 + b"]" * 100_000),  # nesting depth
    st.just(b'{"prompt": "' + b"\\ud800" * 1000 + b'"}'), st.text(max_size=40).map(str.encode))


# --- gRPC requests ---------------------------------------------------------------------------------
U32 = st.one_of(st.integers(0, 3), st.sampled_from([0, 1, 2**31, 2**32 - 1]))


@st.composite
def grpc_request(draw) -> router_pb2.GenerateRequest:
    if draw(SANE):
        return draw(sane_grpc_request())
    p = common_pb2.SamplingParams()
    for name, strat in [("n", U32), ("max_tokens", st.one_of(st.integers(1, 3), st.integers(1, 3), U32)),
                        ("temperature", st.one_of(st.floats(0, 2, width=32), BAD_FLOATS)),
                        ("top_p", st.one_of(st.floats(0, 1, width=32), BAD_FLOATS)),
                        ("top_k", st.integers(-(2**31), 2**31 - 1)),
                        ("repetition_penalty", st.one_of(st.floats(0, 2, width=32), BAD_FLOATS)),
                        ("seed", st.integers(-(2**63), 2**63 - 1)), ("logprobs", U32), ("prompt_logprobs", U32),
                        ("min_tokens", U32)]:
        if draw(st.integers(0, 3)) == 0:
            try:
                setattr(p, name, draw(strat))
            except (ValueError, TypeError):
                pass
    if draw(st.integers(0, 4)) == 0:
        p.stop.extend(draw(st.one_of(st.lists(WORDS, max_size=3), st.just(["s"] * 100), st.just(["z" * 3000]))))
    if draw(st.integers(0, 6)) == 0:
        p.stop_token_ids.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=5)))
    if not p.HasField("max_tokens") or p.max_tokens == 0 or (p.max_tokens > 3 and draw(st.integers(0, 3))):
        p.max_tokens = draw(st.integers(1, 3))  # 0 (unset) generates to the context's end: valid, but slow on CPU
    req = router_pb2.GenerateRequest(params=p, model=draw(st.one_of(st.just(""), st.just(""), st.text(max_size=8),
                                                                    st.just("m" * 20000))))
    kind = draw(st.sampled_from(["text", "text", "chat", "token_ids", "none"]))
    if kind == "text":
        req.text = draw(st.one_of(TEXT, st.just("")))
    elif kind == "chat":
        msgs = draw(st.one_of(st.lists(st.tuples(st.sampled_from(["user", "system", "x"]), TEXT), max_size=3),
                              st.just([("user", "x")] * 5000)))
        req.chat.messages.extend(common_pb2.ChatMessage(role=r, content=c) for r, c in msgs)
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=8)))
    return req


@st.composite
def sane_grpc_request(draw) -> router_pb2.GenerateRequest:
    p = common_pb2.SamplingParams(n=draw(st.integers(1, 2)), max_tokens=draw(st.integers(1, 2)),
                                  temperature=draw(st.floats(0, 2, width=32)))
    if draw(st.booleans()):
        p.seed = draw(st.integers(0, 2**31))
    if draw(st.booleans()):
        p.logprobs = draw(st.integers(0, 3))
    p.stop.extend(draw(st.lists(WORDS, max_size=2)))
    req = router_pb2.GenerateRequest(params=p)
    kind = draw(st.sampled_from(["text", "chat", "token_ids"]))
    if kind == "text":
        req.text = draw(TEXT.filter(bool))
    elif kind == "chat":
        msgs = draw(st.lists(st.tuples(st.sampled_from(["user", "system"]), TEXT), min_size=1, max_size=2))
        req.chat.messages.extend(common_pb2.ChatMessage(role=r, content=c) for r, c in msgs)
    else:
        req.token_ids.ids.extend(draw(SANE_TOKEN_IDS))
    return req


# --- sending and checking --------------------------------------------------------------------------
@dataclass
class Tally:
    """What came back, by kind of request and status."""

    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, status, took: float, bad: str | None = None) -> None:
        with self.lock:  # requests are sent from several threads
            self.counts[f"{kind}:{status}"] += 1
            self.slowest_s = max(self.slowest_s, took)
            if bad is not None:
                self.failures.append(f"{kind}: {bad}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def post_http(client: httpx.Client, tally: Tally, path: str, content: bytes, kind: str,
              headers: dict | None = None) -> int:
    """POST a body; a 5xx, a timeout or a broken response is a failure (recorded in `tally`)."""
    t0 = time.monotonic()
    try:
        with client.stream("POST", path, content=content, timeout=HTTP_TIMEOUT_S,
                           headers=headers or {"content-type": "application/json"}) as r:
            data = b"".join(r.iter_bytes())
            status = r.status_code
    except httpx.TimeoutException:
        tally.add(kind, "timeout", time.monotonic() - t0, f"no answer within {HTTP_TIMEOUT_S}s: {content[:200]!r}")
        return -1
    took = time.monotonic() - t0
    bad = None
    if status >= 500:
        bad = f"{status} {data[:300]!r} for {content[:300]!r}"
    elif status != 200:
        try:
            err = json.loads(data)["error"]
            assert isinstance(err["message"], str) and err["code"] == status
        except Exception:  # noqa: BLE001
            bad = f"{status} without an OpenAI error body: {data[:200]!r}"
    elif b"text/event-stream" in r.headers.get("content-type", "").encode() and b'"error"' in data:
        if b'"code": 5' in data or b'"code":5' in data:
            bad = f"5xx error event in a stream: {data[-300:]!r} for {content[:300]!r}"
    tally.add(kind, status, took, bad)
    return status


def dumps(body) -> bytes:
    """JSON as a careless client writes it: NaN and Infinity as bare words (Python's default)."""
    return json.dumps(body, allow_nan=True).encode()


def call_grpc(stub, tally: Tally, req: router_pb2.GenerateRequest, timeout_s: float = GRPC_TIMEOUT_S,
              kind: str = "grpc") -> grpc.StatusCode:
    t0 = time.monotonic()
    try:
        for _ in stub.Generate(req, timeout=timeout_s):
            pass
        code = grpc.StatusCode.OK
        details = ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    took = time.monotonic() - t0
    bad = None
    allowed = GRPC_OK | ({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
                         if timeout_s < GRPC_TIMEOUT_S else set())
    if code not in allowed:
        bad = f"{code.name} {details[:300]!r} for {str(req)[:300]!r}"
    tally.add(kind, code.name, took, bad)
    return code


def call_raw_grpc(channel: grpc.Channel, tally: Tally, payload: bytes) -> grpc.StatusCode:
    """Bytes that need not decode as a GenerateRequest, straight onto the wire."""
    call = channel.unary_stream("/folio.v1.Router/Generate", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
    t0 = time.monotonic()
    try:
        for _ in call(payload, timeout=GRPC_TIMEOUT_S):
            pass
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    bad = None if code in GRPC_OK else f"{code.name} for bytes {payload[:100]!r}"
    tally.add("grpc-bytes", code.name, time.monotonic() - t0, bad)
    return code


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def oversized_body(limit: int) -> bytes:
    return b'{"prompt": "' + b"x" * (limit + 1024) + b'"}'


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
