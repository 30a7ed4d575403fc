"""Prometheus metrics of one engine, under the names vLLM users already chart (vllm:*), on --metrics-port.

Queue and KV gauges are read from the engine loop's latest snapshot at scrape time; latencies and
token counts are observed by the Generate handler as requests finish.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class _SnapshotCollector:
    def __init__(self, aengine, model_name: str):
        self.aengine = aengine
        self.model_name = model_name

    def collect(self):
        s = self.aengine.snapshot
        m = [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(m, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(m, value)
            return c

        yield gauge("vllm:num_requests_running", "Sequences in the running batch.", s.running)
        yield gauge("vllm:num_requests_waiting", "Sequences waiting to be scheduled.", s.waiting)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).", s.kv_usage)
        yield gauge("folio:kv_blocks_free", "KV blocks free (not cached, not held).", s.free_blocks)
        yield gauge("folio:kv_blocks_evictable", "KV blocks holding cached prefixes, reusable.", s.evictable_blocks)
        yield gauge("folio:kv_blocks_total", "KV pool size in blocks.", s.total_blocks)
        yield counter("vllm:num_preemptions", "Preemptions (recompute) since start.", s.num_preemptions)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)


class EngineMetrics:
    def __init__(self, aengine, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, lab = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", lab,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.", lab,
                             buckets=_REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled.", lab,
                               buckets=_REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", lab, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", lab, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=r)
        r.register(_SnapshotCollector(aengine, model_name))

    def token_gap(self, seconds: float, tokens: int) -> None:
        for _ in range(tokens):
            self.itl.labels(self.model_name).observe(seconds / max(1, tokens))

    def finished(self, prompt_tokens: int, output_tokens: int, queue_s: float, ttft_s: float, e2e_s: float,
                 reasons: list[str]) -> None:
        m = self.model_name
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(output_tokens)
        self.queue.labels(m).observe(queue_s)
        if output_tokens:
            self.ttft.labels(m).observe(ttft_s)
        self.e2e.labels(m).observe(e2e_s)
        for reason in reasons:
            self.success.labels(m, reason or "abort").inc()

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
