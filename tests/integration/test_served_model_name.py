"""--served-model-name: the tokenizer and the engine announce the name, the HTTP API lists and serves it,
and the directory's own name is no longer served."""

from __future__ import annotations

import httpx
import pytest

from folio.stack import free_port
from tests.integration.helpers import SMALL_ENGINE, start_stack

pytestmark = pytest.mark.timeout(300)
NAME = "smollm2-chat"


@pytest.fixture(scope="module")
def named_stack(tmp_path_factory):
    port = free_port()
    s = start_stack(tmp_path_factory, "named", engines=1, http_port=port, served_model_name=NAME,
                    engine_args=SMALL_ENGINE)
    s.http_url = f"http://127.0.0.1:{port}"
    yield s
    s.stop()


def test_served_model_name_is_listed_and_served(named_stack):
    url = named_stack.http_url
    assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]] == [NAME]
    r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "The capital of France is",
                                                  "max_tokens": 4, "temperature": 0}, timeout=120)
    assert r.status_code == 200 and r.json()["model"] == NAME and r.json()["choices"][0]["text"].startswith(" Paris")
    r = httpx.post(url + "/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "x", "max_tokens": 1},
                   timeout=60)
    assert r.status_code == 404
