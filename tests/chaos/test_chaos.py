"""Short chaos run in `make test`: streaming greedy load on a real 2-engine stack with two router replicas
while an engine is SIGKILLed and another SIGSTOPped, and Redis, the tokenizer and one router are killed
and restarted. Every request ends with the offline reference's exact text or a clean retryable status
(UNAVAILABLE / RESOURCE_EXHAUSTED / ABORTED); none is wrong, lost, hung or failed otherwise, and the
engines hold nothing afterwards. bench/chaos.py is the long run."""

from __future__ import annotations

import time

import pytest

from tests.chaos import harness as h
from tests.integration.helpers import engine_stats, start_stack, wait_for

pytestmark = pytest.mark.timeout(300)

ENGINE = ["--num-kv-blocks", "64", "--max-model-len", "512", "--dtype", "float32", "--device", "cpu"]
SCHEDULE = ["engine-sigkill", "redis-restart", "tokenizer-restart", "router-restart"]


def test_faults_under_streaming_load_lose_nothing(tmp_path_factory, offline_llm):
    expected = h.reference(offline_llm)
    stack = start_stack(tmp_path_factory, "chaos", engines=2, engine_args=ENGINE)
    try:
        router2 = h.add_router(stack)
        load = h.Load([stack.router_address, router2.address], expected, workers=3).start()
        try:
            time.sleep(5)
            for name in SCHEDULE:
                h.FAULTS[name](stack)
                time.sleep(5)
            h.freeze(stack, "engine1", 6.0)
            time.sleep(5)
        finally:
            load.stop()
        c = load.tally.counts
        print(f"\nchaos: {dict(c)}, slowest {load.tally.slowest_s:.1f}s; {load.tally.details[:5]}")
        assert c["wrong"] == c["lost"] == c["hung"] == c["error"] == 0, load.tally.details
        assert c["exact"] >= 10
        for addr in stack.engine_addresses:
            wait_for(lambda: (s := engine_stats(addr)).running + s.waiting == 0, timeout=10, interval=0.1,
                     what=f"engine {addr} idle after the run")
    finally:
        stack.stop()
