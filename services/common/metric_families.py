"""Every Prometheus metric Folio exports, declared once (name, help, labels, buckets); engine and router use these.

Names follow vLLM's (`vllm:*`) so existing dashboards work, and Folio's own are `folio:*`. Histogram
buckets are vLLM's (vllm/v1/metrics/loggers.py), the same in the engine and the router so their
series can be compared. A family is either an instrument a process observes into (`instrument`) or a
value read at scrape time by a collector (`family`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)

MODEL = ("model_name",)


@dataclass(frozen=True)
class MetricFamily:
    name: str
    """Without the `_total` suffix Prometheus adds to counters."""
    help: str
    kind: Literal["counter", "gauge", "histogram"]
    labels: tuple[str, ...] = MODEL
    buckets: tuple[float, ...] | None = None

    def instrument(self, registry):
        """A Counter / Gauge / Histogram registered in `registry`, for values observed as they happen."""
        if self.kind == "histogram":
            return Histogram(self.name, self.help, self.labels, buckets=self.buckets, registry=registry)
        cls = Counter if self.kind == "counter" else Gauge
        return cls(self.name, self.help, self.labels, registry=registry)

    def family(self):
        """An empty metric family for a collector to fill at scrape time (`add_metric(labels, value)`)."""
        if self.kind == "histogram":
            raise TypeError(f"{self.name} is a histogram: observe it through instrument()")
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        return cls(self.name, self.help, labels=list(self.labels))

    def sample(self, label_values, value):
        """A family holding one sample (a collector reporting one process's value)."""
        f = self.family()
        f.add_metric(list(label_values), value)
        return f


# --- request timings and token counts (engine: its own requests; router: as its clients see them) -----
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
TIME_TO_FIRST_TOKEN = MetricFamily("vllm:time_to_first_token_seconds",
                                   "Seconds from a request's arrival to its first output token.", "histogram",
                                   buckets=TTFT_BUCKETS)
INTER_TOKEN_LATENCY = MetricFamily("vllm:inter_token_latency_seconds", "Seconds between a request's output tokens.",
                                   "histogram", buckets=ITL_BUCKETS)
TIME_PER_OUTPUT_TOKEN = MetricFamily("vllm:time_per_output_token_seconds",
                                     "Per request: (e2e - ttft) / (output tokens - 1).", "histogram",
                                     buckets=ITL_BUCKETS)
E2E_REQUEST_LATENCY = MetricFamily("vllm:e2e_request_latency_seconds",
                                   "Seconds from a request's arrival to its last token.", "histogram",
                                   buckets=REQUEST_BUCKETS)
REQUEST_QUEUE_TIME = MetricFamily("vllm:request_queue_time_seconds",
                                  "Seconds a request waited in the engine's queue before it was first scheduled.",
                                  "histogram", buckets=REQUEST_BUCKETS)
REQUEST_PREFILL_TIME = MetricFamily("vllm:request_prefill_time_seconds",
                                    "Seconds from a request's first scheduling to its first output token.",
                                    "histogram", buckets=REQUEST_BUCKETS)
REQUEST_DECODE_TIME = MetricFamily("vllm:request_decode_time_seconds",
                                   "Seconds from a request's first output token to its last.", "histogram",
                                   buckets=REQUEST_BUCKETS)
REQUEST_PROMPT_TOKENS = MetricFamily("vllm:request_prompt_tokens", "Prompt tokens per finished request.",
                                     "histogram", buckets=TOKEN_BUCKETS)
REQUEST_GENERATION_TOKENS = MetricFamily("vllm:request_generation_tokens", "Generated tokens per finished request.",
                                         "histogram", buckets=TOKEN_BUCKETS)
PROMPT_TOKENS = MetricFamily("vllm:prompt_tokens", "Prompt tokens of finished requests.", "counter")
GENERATION_TOKENS = MetricFamily("vllm:generation_tokens", "Generated tokens.", "counter")
REQUEST_SUCCESS = MetricFamily("vllm:request_success", "Finished requests by finish reason.", "counter",
                               labels=("model_name", "finished_reason"))

# --- engine state (engine: its last step; router: summed over the model's engines' last reports) ------
NUM_REQUESTS_RUNNING = MetricFamily("vllm:num_requests_running", "Sequences in the running batch.", "gauge")
NUM_REQUESTS_WAITING = MetricFamily("vllm:num_requests_waiting", "Sequences waiting to be scheduled.", "gauge")
KV_CACHE_USAGE = MetricFamily("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).", "gauge")
KV_BLOCKS_FREE = MetricFamily("folio:kv_blocks_free", "KV blocks free (not cached, not held).", "gauge")
KV_BLOCKS_EVICTABLE = MetricFamily("folio:kv_blocks_evictable", "KV blocks holding cached prefixes, reusable.",
                                   "gauge")
# Was folio:kv_blocks_total: promtool flags a gauge whose name ends in _total (a counter's suffix).
KV_BLOCKS = MetricFamily("folio:kv_blocks", "KV pool size in blocks.", "gauge")
NUM_PREEMPTIONS = MetricFamily("vllm:num_preemptions", "Preemptions (recompute) since start.", "counter")
PREFIX_CACHE_QUERIES = MetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                    "counter")
PREFIX_CACHE_HITS = MetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", "counter")

# --- the router's own ---------------------------------------------------------------------------------
ENGINES = MetricFamily("folio:engines", "Live engines serving the model.", "gauge")
ROUTER_REDIS_OK = MetricFamily("folio:router_redis_ok", "1 while the router reaches Redis.", "gauge", labels=())
ROUTER_REQUESTS_IN_FLIGHT = MetricFamily("folio:router_requests_in_flight", "Requests in this router now.", "gauge",
                                         labels=())
ROUTER_RETRIES = MetricFamily("folio:router_retries", "Requests moved to another engine before their first token.",
                              "counter", labels=())
ROUTER_FAILOVERS = MetricFamily("folio:router_failovers", "Requests continued on another engine mid-stream.", "counter",
                                labels=())
HTTP_REQUESTS = MetricFamily("folio:http_requests", "HTTP API responses by path and status.", "counter",
                             labels=("path", "status"))
