"""Request-size limits (services/common/request_limits.py) on the router's HTTP API, over fake clients:
every oversized request is a 400 (or 413) naming the field and the limit, before any per-choice work."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc

import pytest
from starlette.testclient import TestClient

from services.common.errors import InvalidArgument
from services.common.request_limits import RequestLimits
from services.common.sampling_params import SamplingParams
from services.router.messages import GenerateInput
from services.router.openai import build_app
from tests.unit.router_fakes import FakeEngine, make_router


@pytest.fixture(scope="module")
def client():
    r = make_router(a=FakeEngine())
    r.core.limits = RequestLimits(max_body_bytes=1 << 20)
    with TestClient(build_app(r.core)) as c:
        yield c


def _err(resp, status: int, param: str | None, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == status
    if param is not None:
        assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err["message"]
    return err


def test_huge_n_is_refused_at_once_without_memory(client):
    tracemalloc.start()
    t0 = time.monotonic()
    resp = client.post("/v1/completions", json={"prompt": "Hi", "n": 4294967296})
    took = time.monotonic() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    _err(resp, 400, "n", "4294967296", "128", "--max-n")
    assert took < 1.0 and peak < 5 << 20  # was: a dict of 2**32 choices (the router OOM-killed)


@pytest.mark.parametrize("path,body,param,words", [
    ("/v1/completions", {"prompt": "Hi", "n": 129}, "n", ("128",)),
    ("/v1/completions", {"prompt": "Hi", "n": 2, "best_of": 1000}, "best_of", ("128",)),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, "logprobs", ("20",)),
    ("/v1/completions", {"prompt": "Hi", "stop": ["x"] * 17}, "stop", ("17", "16")),
    ("/v1/completions", {"prompt": "Hi", "stop": "y" * 1025}, "stop", ("1025", "1024")),
    ("/v1/completions", {"prompt": "Hi", "stop_token_ids": list(range(1025))}, "stop_token_ids", ("1024",)),
    ("/v1/completions", {"prompt": ["a"] * 257}, "prompt", ("257", "256")),
    ("/v1/completions", {"prompt": ["a"] * 20, "n": 100}, "n", ("2000", "1024")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 4097}, "messages", ("4096",)),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 1025}]},
     "messages", ("messages[0].content", "1024")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 50},
     "top_logprobs", ("20",)),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 10**12}, "n", ("128",)),
])
def test_each_limit_is_a_400_naming_field_and_limit(client, path, body, param, words):
    _err(client.post(path, json=body), 400, param, *words)


def test_oversized_body_is_413_from_content_length(client):
    body = json.dumps({"prompt": "x" * (1100 << 10)})
    _err(client.post("/v1/completions", content=body, headers={"content-type": "application/json"}),
         413, None, str(1 << 20), "--max-body-bytes")


def test_oversized_chunked_body_is_413(client):
    def gen():
        yield b'{"prompt": "'
        for _ in range(1100):
            yield b"x" * 1024
        yield b'"}'
    _err(client.post("/v1/completions", content=gen(), headers={"content-type": "application/json"}),
         413, None, "--max-body-bytes")


def test_limits_are_checked_on_the_core_api_too():
    """The gRPC servicer and any Python caller go through RouterCore.generate, which checks the same limits."""
    r = make_router(a=FakeEngine())

    async def go(inp):
        return [c async for c in r.core.generate(inp)]

    for params, inp_kw, word in [(dict(n=1000), {}, "n:"), (dict(stop=["s"] * 40), {}, "stop:"),
                                 (dict(logprobs=20), {}, None),
                                 (dict(), {"messages": [{"role": "user", "content": "x"}] * 5000}, "messages:")]:
        inp = GenerateInput(params=SamplingParams(max_tokens=2, **params), prompt=None if inp_kw else "abc",
                            request_id="r", **inp_kw)
        if word is None:
            assert asyncio.run(go(inp))[-1].finished
            continue
        with pytest.raises(InvalidArgument, match=word):
            asyncio.run(go(inp))
    assert not r.engines["a"].calls[1:]  # only the accepted request reached an engine


def test_limits_refuse_nonsense_values():
    with pytest.raises(ValueError, match="max_n"):
        RequestLimits(max_n=0)
