"""The router's Prometheus metrics (HTTP /metrics): vLLM's names, aggregated over engines and its own requests.

Two sources. Gauges of the engines' state (requests running / waiting, KV usage) are summed per model
at scrape time from the registry view the router already keeps (every engine's last Redis report,
refreshed twice a second), so they need no extra call. Latencies and token counts are the router's
own: `track()` wraps a `RouterCore.generate()` stream (HTTP and gRPC alike) and observes time to
first token, inter-token latency, end-to-end latency and the token counts as the client sees them,
which include tokenization, routing, retries and detokenization, unlike an engine's own histograms.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from collections import defaultdict
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's buckets (vllm/v1/metrics/loggers.py).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineStateCollector:
    """Per-model sums of the engines' last reports, read at scrape time."""

    def __init__(self, core):
        self.core = core

    def collect(self):
        s = self.core.stats()
        per_model: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for e in s["engines"]:
            m, load = per_model[e.model], e.load
            m["engines"] += 1
            m["running"] += load.running
            m["waiting"] += load.waiting
            m["total"] += load.total_blocks
            m["free"] += load.free_blocks
            m["evictable"] += load.evictable_blocks

        def family(cls, name, doc, key):
            f = cls(name, doc, labels=["model_name"])
            for model, m in sorted(per_model.items()):
                f.add_metric([model], key(m))
            return f

        yield family(GaugeMetricFamily, "vllm:num_requests_running", "Requests running on the model's engines.",
                     lambda m: m["running"])
        yield family(GaugeMetricFamily, "vllm:num_requests_waiting", "Requests waiting on the model's engines.",
                     lambda m: m["waiting"])
        yield family(GaugeMetricFamily, "vllm:kv_cache_usage_perc",
                     "Fraction of the model's KV blocks in use over all its engines (1 = full).",
                     lambda m: (m["total"] - m["free"] - m["evictable"]) / m["total"] if m["total"] else 0.0)
        yield family(GaugeMetricFamily, "folio:engines", "Live engines serving the model.", lambda m: m["engines"])
        yield family(GaugeMetricFamily, "folio:kv_blocks_free", "Free KV blocks over the model's engines.",
                     lambda m: m["free"])
        yield family(GaugeMetricFamily, "folio:kv_blocks_total", "KV blocks over the model's engines.",
                     lambda m: m["total"])
        yield GaugeMetricFamily("folio:router_redis_ok", "1 while the router reaches Redis.",
                                value=float(s["redis_ok"]))
        yield GaugeMetricFamily("folio:router_requests_in_flight", "Requests in this router now.", value=s["in_flight"])
        yield CounterMetricFamily("folio:router_retries", "Requests moved to another engine before their first token.",
                                  value=s["retries"])
        yield CounterMetricFamily("folio:router_failovers", "Requests continued on another engine mid-stream.",
                                  value=s["failovers"])


class RouterMetrics:
    def __init__(self, core):
        self.registry = r = CollectorRegistry()
        lab = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token, as the router's client sees it.",
                              lab, buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens at the router.", lab,
                             buckets=_ITL_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Per request: (e2e - ttft) / (output tokens - 1).",
                              lab, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival at the router to the last token.", lab,
                             buckets=_REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time waiting in the engine's queue.", lab,
                               buckets=_REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", lab, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", lab, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=r)
        self.http_requests = Counter("folio:http_requests", "HTTP API responses by path and status.",
                                     ["path", "status"], registry=r)
        r.register(_EngineStateCollector(core))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def track(self, chunks: AsyncIterator) -> AsyncIterator:
        """Pass a `RouterCore.generate()` stream through, observing its timings and token counts."""
        t0 = time.monotonic()
        first = last = None
        tokens = 0
        async with aclosing(chunks):  # a consumer that stops early closes the core's stream (and the engine call) now
            async for chunk in chunks:
                model = chunk.model
                n = sum(len(c.token_ids) for c in chunk.choices)
                if n:
                    now = time.monotonic()
                    if first is None:
                        first = now
                        self.ttft.labels(model).observe(now - t0)
                        n_gap = n - 1  # tokens of the first chunk beyond the first came with it
                    else:
                        n_gap = n
                    if last is not None and n_gap:
                        gap = (now - last) / n_gap
                        for _ in range(n_gap):
                            self.itl.labels(model).observe(gap)
                    last = now
                    tokens += n
                if chunk.finished:
                    now = time.monotonic()
                    self.e2e.labels(model).observe(now - t0)
                    if first is not None and tokens > 1:
                        self.tpot.labels(model).observe((now - first) / (tokens - 1))
                    q = chunk.timing.get("engine_queue_s")
                    if q is not None:
                        self.queue.labels(model).observe(q)
                    if chunk.usage is not None:
                        self.prompt_tokens.labels(model).inc(chunk.usage.prompt_tokens)
                        self.generation_tokens.labels(model).inc(chunk.usage.completion_tokens)
                for c in chunk.choices:
                    if c.finish_reason is not None:
                        self.success.labels(model, c.finish_reason).inc()
                yield chunk
