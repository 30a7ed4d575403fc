"""Start options that change how the services name and reach each other, on one stack started with both:

- `--served-model-name`: the tokenizer and the engine announce the name, the HTTP API lists and serves it, and the
  directory's own name is no longer served;
- unix-domain sockets: an engine with --unix-socket is routed to through it (its registry address is unix:PATH),
  and a client reaches the router through the router's own socket."""

from __future__ import annotations

import httpx
import pytest

from folio.stack import free_port
from protos.gen.folio.v1 import router_pb2
from tests.integration.helpers import SMALL_ENGINE, generate, params, router_stub, start_stack

pytestmark = pytest.mark.timeout(300)
NAME = "smollm2-chat"


@pytest.fixture(scope="module")
def options_stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("uds")
    port = free_port()
    s = start_stack(tmp_path_factory, "options", engines=1, http_port=port, served_model_name=NAME,
                    engine_args=SMALL_ENGINE + ["--unix-socket", str(d / "e.sock")],
                    router_args=["--unix-socket", str(d / "r.sock")])
    s.http_url = f"http://127.0.0.1:{port}"
    s.engine_uds, s.router_uds = f"unix:{d / 'e.sock'}", f"unix:{d / 'r.sock'}"
    yield s
    s.stop()


def test_served_model_name_is_listed_and_served(options_stack):
    url = options_stack.http_url
    assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]] == [NAME]
    r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "The capital of France is",
                                                  "max_tokens": 4, "temperature": 0}, timeout=120)
    assert r.status_code == 200 and r.json()["model"] == NAME and r.json()["choices"][0]["text"].startswith(" Paris")
    r = httpx.post(url + "/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "x", "max_tokens": 1},
                   timeout=60)
    assert r.status_code == 404


def test_engine_and_router_over_unix_sockets(options_stack):
    stack = options_stack
    ch, stub = router_stub(stack.router_uds)
    with ch:
        engines = stub.Stats(router_pb2.RouterStatsRequest(), timeout=30).engines
    assert [e.address for e in engines] == [stack.engine_uds]
    over_uds = generate(stack.router_uds, token_ids=router_pb2.TokenIds(ids=[20, 21, 22]),
                        params=params(max_tokens=5, temperature=0, ignore_eos=True))
    over_tcp = generate(stack.router_address, token_ids=router_pb2.TokenIds(ids=[20, 21, 22]),
                        params=params(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(over_uds.token_ids[0]) == 5
    assert over_uds.token_ids == over_tcp.token_ids
    assert over_uds.engine_ids == [stack.engine_uds] * len(over_uds.engine_ids)
