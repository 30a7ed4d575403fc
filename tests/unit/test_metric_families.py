"""Engine and router export metric families declared once (services/common/metric_families.py): the same
names, help and buckets in both processes, and nothing exported that the catalog does not declare."""

from __future__ import annotations

from types import SimpleNamespace

from services.common import metric_families as mf
from services.common.engine_load import EngineLoad
from services.common.registry import EngineRecord
from services.engine.metrics import EngineMetrics
from services.router.metrics import RouterMetrics

CATALOG = {f.name: f for f in vars(mf).values() if isinstance(f, mf.MetricFamily)}
LOAD = EngineLoad(total_blocks=10, free_blocks=4, evictable_blocks=1, running=2, waiting=3, num_preemptions=7)


class _Core:
    def stats(self):
        rec = EngineRecord(engine_id="e", address="a:1", model="m", max_model_len=64, load=LOAD)
        return {"redis_ok": True, "engines": [rec], "in_flight": 1, "retries": 2, "failovers": 0, "requests_total": 5}


def _scrape(registry) -> dict:
    """The families a scrape would show (read from the registry, as the exposition writer does)."""
    return {f.name: f for f in registry.collect()}


def _buckets(family) -> list[float]:
    return sorted({float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")})


def _observe_one_of_each(metrics) -> None:
    for h in (metrics.ttft, metrics.itl, metrics.e2e, metrics.queue, metrics.prefill, metrics.decode,
              metrics.prompt_hist, metrics.generation_hist):
        h.labels("m").observe(0.5)


def test_engine_and_router_export_the_shared_families_identically():
    engine = EngineMetrics(SimpleNamespace(snapshot=LOAD), "m")
    router = RouterMetrics(_Core())
    _observe_one_of_each(engine)
    _observe_one_of_each(router)
    router.tpot.labels("m").observe(0.1)
    e, r = _scrape(engine.registry), _scrape(router.registry)
    for name, fam in {**e, **r}.items():
        assert name in CATALOG, f"{name} is exported but not declared in metric_families"
        assert fam.documentation == CATALOG[name].help
    shared = set(e) & set(r)
    assert {"vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
            "vllm:request_queue_time_seconds", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"} <= shared
    for name in shared:
        if e[name].type == "histogram":
            assert _buckets(e[name]) == _buckets(r[name]) == sorted([*CATALOG[name].buckets, float("inf")])


def test_scrape_time_values_come_from_the_engine_load():
    e = _scrape(EngineMetrics(SimpleNamespace(snapshot=LOAD), "m").registry)
    value = lambda fam: e[fam.name].samples[0].value  # noqa: E731
    assert value(mf.NUM_REQUESTS_RUNNING) == 2 and value(mf.NUM_REQUESTS_WAITING) == 3
    assert value(mf.KV_CACHE_USAGE) == 0.5 and value(mf.KV_BLOCKS_EVICTABLE) == 1 and value(mf.NUM_PREEMPTIONS) == 7
    r = _scrape(RouterMetrics(_Core()).registry)
    assert r[mf.ENGINES.name].samples[0].value == 1 and r[mf.KV_CACHE_USAGE.name].samples[0].value == 0.5
    assert r[mf.ROUTER_RETRIES.name].samples[0].value == 2
