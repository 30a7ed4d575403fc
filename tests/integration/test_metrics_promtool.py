"""`promtool check metrics` (Debian's prometheus package) on the router's and an engine's /metrics after traffic.

Clean but for the colon in vLLM's metric names (kept: dashboards query them).

Skips only where promtool is absent. Also checks OpenMetrics negotiation: a scraper that asks for
application/openmetrics-text gets it (with its # EOF), a plain one gets the Prometheus text format.
"""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest

from folio.stack import free_port
from tests.integration.helpers import SMALL_ENGINE, start_stack

pytestmark = pytest.mark.timeout(300)
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@pytest.fixture(scope="module")
def metrics_stack(tmp_path_factory):
    http_port, engine_metrics = free_port(), free_port()
    s = start_stack(tmp_path_factory, "promtool", engines=1, http_port=http_port,
                    engine_args=SMALL_ENGINE + ["--metrics-port", str(engine_metrics)])
    s.http_url = f"http://127.0.0.1:{http_port}"
    s.engine_metrics_url = f"http://127.0.0.1:{engine_metrics}/metrics"
    r = httpx.post(s.http_url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=120)
    assert r.status_code == 200, r.text
    yield s
    s.stop()


def _urls(s):
    return {"router": s.http_url + "/metrics", "engine": s.engine_metrics_url}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool absent (Debian: apt-get install prometheus)")
@pytest.mark.parametrize("which", ["router", "engine"])
def test_promtool_check_metrics(metrics_stack, which):
    text = httpx.get(_urls(metrics_stack)[which], timeout=30).text
    for name in ("vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                 "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                 "vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:num_preemptions",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "folio:kv_blocks"):
        assert f"# TYPE {name} " in text or f"# TYPE {name}_total counter" in text, name
    assert f'vllm:request_generation_tokens_count{{model_name=' in text
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    # promtool exits 1 on a parse error and 3 on lint findings. The one lint Folio keeps on purpose:
    # vLLM's names (vllm:..., and folio:... beside them) have a colon, which promtool reserves for
    # recording rules; dashboards built for vLLM query those names. Every other finding fails.
    findings = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    others = [ln for ln in findings if not ln.endswith("metric names should not contain ':'")]
    assert r.returncode in (0, 3) and not others, r.stdout + r.stderr


@pytest.mark.parametrize("which", ["router", "engine"])
def test_openmetrics_negotiation(metrics_stack, which):
    url = _urls(metrics_stack)[which]
    om = httpx.get(url, headers={"Accept": OPENMETRICS}, timeout=30)
    assert om.headers["content-type"].startswith("application/openmetrics-text"), om.headers
    assert om.text.rstrip().endswith("# EOF")
    plain = httpx.get(url, timeout=30)
    assert plain.headers["content-type"].startswith("text/plain"), plain.headers
    assert "# EOF" not in plain.text
