"""folio:http_requests counts each HTTP response once by path and status (app.py `ApiKeyAndCount`): a streamed
completion after its first event went out, a JSON body, an error before the stream, a refused API key."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx

from services.router.metrics import RouterMetrics
from services.router.openai.app import build_app
from tests.unit.router_fakes import MODEL, FakeEngine, make_router


def count(metrics: RouterMetrics, path: str, status: int) -> float:
    return metrics.http_requests.labels(path, str(status))._value.get()


def test_each_response_counted_once_by_status():
    r = make_router(a=FakeEngine())
    r.registry.models = lambda: {MODEL: [SimpleNamespace(max_model_len=64)]}
    metrics = RouterMetrics(r.core)
    app = build_app(r.core, api_key="k", metrics=metrics)
    auth = {"authorization": "Bearer k"}
    body = {"model": MODEL, "prompt": [97, 98, 99], "max_tokens": 3, "temperature": 0}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
            async with h.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=auth) as resp:
                assert resp.status_code == 200
                events = [line async for line in resp.aiter_lines() if line.startswith("data: {")]
            assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events) == "def"
            assert (await h.post("/v1/completions", json=body, headers=auth)).status_code == 200
            too_long = {**body, "max_tokens": 100}
            assert (await h.post("/v1/completions", json={**too_long, "stream": True}, headers=auth)).status_code == 400
            assert (await h.post("/v1/completions", json=body)).status_code == 401

    asyncio.run(main())
    assert count(metrics, "/v1/completions", 200) == 2
    assert count(metrics, "/v1/completions", 400) == 1
    assert count(metrics, "/v1/completions", 401) == 1
