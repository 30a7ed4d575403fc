"""The router's Prometheus metrics (HTTP /metrics): vLLM's names, aggregated over engines and its own requests.

Two sources. Gauges of the engines' state (requests running / waiting, KV usage) are summed per model
at scrape time from the registry view the router already keeps (every engine's last Redis report,
refreshed twice a second), so they need no extra call. Latencies and token counts are the router's
own: `track()` wraps a `RouterCore.generate()` stream (HTTP and gRPC alike) and observes time to
first token, inter-token latency, end-to-end latency and the token counts as the client sees them,
which include tokenization, routing, retries and detokenization, unlike an engine's own histograms.
The families (names, help, buckets) are declared in services/common/metric_families.py, shared with
the engine, so the two processes' series have the same buckets.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from collections import defaultdict
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.exposition import choose_encoder

from services.common import metric_families as mf

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
            m["preemptions"] += load.num_preemptions
            m["prefix_queries"] += load.prefix_cache_queries
            m["prefix_hits"] += load.prefix_cache_hits

        def per_model_family(fam, key):
            f = fam.family()
            for model, m in sorted(per_model.items()):
                f.add_metric([model], key(m))
            return f

        yield per_model_family(mf.NUM_REQUESTS_RUNNING, lambda m: m["running"])
        yield per_model_family(mf.NUM_REQUESTS_WAITING, lambda m: m["waiting"])
        yield per_model_family(mf.KV_CACHE_USAGE,  # over all the model's engines
                               lambda m: (m["total"] - m["free"] - m["evictable"]) / m["total"] if m["total"] else 0.0)
        yield per_model_family(mf.ENGINES, lambda m: m["engines"])
        yield per_model_family(mf.KV_BLOCKS_FREE, lambda m: m["free"])
        yield per_model_family(mf.KV_BLOCKS, lambda m: m["total"])
        # Counters summed over the live engines' reports (one that leaves takes its counts with it).
        yield per_model_family(mf.NUM_PREEMPTIONS, lambda m: m["preemptions"])
        yield per_model_family(mf.PREFIX_CACHE_QUERIES, lambda m: m["prefix_queries"])
        yield per_model_family(mf.PREFIX_CACHE_HITS, lambda m: m["prefix_hits"])
        yield mf.ROUTER_REDIS_OK.sample([], float(s["redis_ok"]))
        yield mf.ROUTER_REQUESTS_IN_FLIGHT.sample([], s["in_flight"])
        yield mf.ROUTER_RETRIES.sample([], s["retries"])
        yield mf.ROUTER_FAILOVERS.sample([], s["failovers"])


class RouterMetrics:
    def __init__(self, core):
        self.registry = r = CollectorRegistry()
        self.ttft = mf.TIME_TO_FIRST_TOKEN.instrument(r)
        self.itl = mf.INTER_TOKEN_LATENCY.instrument(r)
        self.tpot = mf.TIME_PER_OUTPUT_TOKEN.instrument(r)
        self.e2e = mf.E2E_REQUEST_LATENCY.instrument(r)
        self.queue = mf.REQUEST_QUEUE_TIME.instrument(r)
        self.prefill = mf.REQUEST_PREFILL_TIME.instrument(r)
        self.decode = mf.REQUEST_DECODE_TIME.instrument(r)
        self.prompt_hist = mf.REQUEST_PROMPT_TOKENS.instrument(r)
        self.generation_hist = mf.REQUEST_GENERATION_TOKENS.instrument(r)
        self.prompt_tokens = mf.PROMPT_TOKENS.instrument(r)
        self.generation_tokens = mf.GENERATION_TOKENS.instrument(r)
        self.success = mf.REQUEST_SUCCESS.instrument(r)
        self.http_requests = mf.HTTP_REQUESTS.instrument(r)
        r.register(_EngineStateCollector(core))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its content type: OpenMetrics when `accept` (the scraper's Accept header)
        asks for it, else the Prometheus text format (prometheus_client's own negotiation)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    async def track(self, chunks: AsyncIterator) -> AsyncIterator:
        """Pass a `RouterCore.generate()` stream through, observing its timings and token counts."""
        t0 = time.monotonic()
        first = last = None
        tokens = 0
        async with aclosing(chunks):  # a consumer that stops early closes the core's stream (and the engine call) now
            async for chunk in chunks:
                model = chunk.model
                n = sum(len(c.token_ids) for c in chunk.choices)
                first_now = False
                if n:
                    now = time.monotonic()
                    if first is None:
                        first, first_now = now, True
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
                    if first is not None:  # prefill: to the first token, less the engine's queue wait
                        self.prefill.labels(model).observe(max(0.0, first - t0 - (q or 0.0)))
                        self.decode.labels(model).observe(now - first)
                    if chunk.usage is not None:
                        self.prompt_hist.labels(model).observe(chunk.usage.prompt_tokens)
                        self.generation_hist.labels(model).observe(chunk.usage.completion_tokens)
                        self.prompt_tokens.labels(model).inc(chunk.usage.prompt_tokens)
                        self.generation_tokens.labels(model).inc(chunk.usage.completion_tokens)
                for c in chunk.choices:
                    if c.finish_reason is not None:
                        self.success.labels(model, c.finish_reason).inc()
                try:
                    yield chunk
                finally:  # the first token's time is observed once its chunk went on: off the way to the client
                    if first_now:
                        self.ttft.labels(model).observe(first - t0)
