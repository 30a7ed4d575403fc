"""Prometheus metrics of one engine, under the names vLLM users already chart (vllm:*), on --metrics-port.

Queue and KV gauges are read from the engine loop's latest snapshot at scrape time; latencies and
token counts are observed by the Generate handler as requests finish. The families (names, help,
buckets) are declared in services/common/metric_families.py, shared with the router.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server

from services.common import metric_families as mf


class _SnapshotCollector:
    def __init__(self, aengine, model_name: str):
        self.aengine = aengine
        self.model_name = model_name

    def collect(self):
        s, m = self.aengine.snapshot, [self.model_name]
        yield mf.NUM_REQUESTS_RUNNING.sample(m, s.running)
        yield mf.NUM_REQUESTS_WAITING.sample(m, s.waiting)
        yield mf.KV_CACHE_USAGE.sample(m, s.kv_usage)
        yield mf.KV_BLOCKS_FREE.sample(m, s.free_blocks)
        yield mf.KV_BLOCKS_EVICTABLE.sample(m, s.evictable_blocks)
        yield mf.KV_BLOCKS.sample(m, s.total_blocks)
        yield mf.NUM_PREEMPTIONS.sample(m, s.num_preemptions)
        yield mf.PREFIX_CACHE_QUERIES.sample(m, s.prefix_cache_queries)
        yield mf.PREFIX_CACHE_HITS.sample(m, s.prefix_cache_hits)


class EngineMetrics:
    def __init__(self, aengine, model_name: str):
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        self.ttft = mf.TIME_TO_FIRST_TOKEN.instrument(r)
        self.itl = mf.INTER_TOKEN_LATENCY.instrument(r)
        self.e2e = mf.E2E_REQUEST_LATENCY.instrument(r)
        self.queue = mf.REQUEST_QUEUE_TIME.instrument(r)
        self.prefill = mf.REQUEST_PREFILL_TIME.instrument(r)
        self.decode = mf.REQUEST_DECODE_TIME.instrument(r)
        self.prompt_hist = mf.REQUEST_PROMPT_TOKENS.instrument(r)
        self.generation_hist = mf.REQUEST_GENERATION_TOKENS.instrument(r)
        self.prompt_tokens = mf.PROMPT_TOKENS.instrument(r)
        self.generation_tokens = mf.GENERATION_TOKENS.instrument(r)
        self.success = mf.REQUEST_SUCCESS.instrument(r)
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
        self.prompt_hist.labels(m).observe(prompt_tokens)
        self.generation_hist.labels(m).observe(output_tokens)
        if output_tokens:
            self.ttft.labels(m).observe(ttft_s)
            self.prefill.labels(m).observe(max(0.0, ttft_s - queue_s))  # both from arrival
            self.decode.labels(m).observe(max(0.0, e2e_s - ttft_s))
        self.e2e.labels(m).observe(e2e_s)
        for reason in reasons:
            self.success.labels(m, reason or "abort").inc()

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
