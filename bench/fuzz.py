"""Long fuzz run against a local stack (the long variant of tests/fuzz/): hostile HTTP and gRPC requests.

    python bench/fuzz.py [--scale 5] [--engines 2] [--json bench/results/fuzz-<date>.json]

Starts tokenizer, engines and router (with HTTP) on loopback, sends `scale` times the test suite's mix of
generated requests (tests/fuzz/fuzzing.py: refusals, served requests, garbage bodies, undecodable gRPC
bytes, oversized bodies) from 8 threads, with fresh examples (not derandomized), and records: answers by
kind and status, bad answers (5xx, INTERNAL/UNKNOWN/UNAVAILABLE, timeouts), the slowest answer, router
and tokenizer RSS over the run, dead processes, and how long the engines take to hold nothing afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402
import httpx  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402

from folio.stack import Stack, StackConfig, free_port  # noqa: E402
from protos.gen.folio.v1 import router_pb2_grpc  # noqa: E402
from tests.fuzz import fuzzing as fz  # noqa: E402
from tests.integration.helpers import engine_stats  # noqa: E402

MIX = {"completions": 480, "chat": 330, "garbage": 300, "grpc": 520, "grpc-bytes": 350}
"""Requests per unit of --scale (the test suite's mix)."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=5.0, help="multiples of the test suite's request mix")
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--json", default=None, help="output (default bench/results/fuzz-<date>.json)")
    a = ap.parse_args()
    port = free_port()
    stack = Stack(StackConfig(log_dir=Path(tempfile.mkdtemp(prefix="fuzz-")), engines=a.engines, router_port=0,
                              http_port=port, env={"OMP_NUM_THREADS": "1"},
                              engine_args=["--num-kv-blocks", "64", "--max-model-len", "256", "--dtype", "float32",
                                           "--device", "cpu"],
                              router_args=["--max-body-bytes", str(1 << 20)])).start()
    try:
        return run(stack, port, a)
    finally:
        stack.stop()


def run(stack: Stack, port: int, a) -> int:
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}")
    channel = grpc.insecure_channel(stack.router_address)
    stub = router_pb2_grpc.RouterStub(channel)
    tally = fz.Tally()
    pids = {p.name: p.popen.pid for p in stack.procs if p.name in ("router", "tokenizer")}
    for i in range(10):  # warm-up before the memory baseline
        fz.post_http(http, tally, "/v1/completions", fz.dumps({"prompt": f"Hi {i}", "max_tokens": 2}), "warm")
    rss = [{"t": 0.0, **{k: fz.rss_mb(v) for k, v in pids.items()}}]
    pool = ThreadPoolExecutor(8)
    t0 = time.monotonic()
    cfg = dict(deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))

    def phase(kind: str, strategy, send):
        @settings(max_examples=int(MIX[kind] * a.scale), **cfg)
        @given(strategy)
        def one(x):
            pool.submit(send, x)
        one()

    phase("completions", fz.completion_body(),
          lambda b: fz.post_http(http, tally, "/v1/completions", fz.dumps(b), "completions"))
    phase("chat", fz.chat_body(), lambda b: fz.post_http(http, tally, "/v1/chat/completions", fz.dumps(b), "chat"))
    phase("garbage", fz.RAW_BODIES, lambda b: fz.post_http(http, tally, "/v1/completions", b, "garbage"))
    phase("grpc", fz.grpc_request(), lambda r: fz.call_grpc(stub, tally, r))
    phase("grpc-bytes", st.binary(max_size=64), lambda b: fz.call_raw_grpc(channel, tally, b))
    for _ in range(int(4 * a.scale)):
        pool.submit(fz.post_http, http, tally, "/v1/completions", fz.oversized_body(1 << 20), "oversized")
    while pool._work_queue.qsize():  # sample memory while the queue drains
        time.sleep(2)
        rss.append({"t": round(time.monotonic() - t0, 1), **{k: fz.rss_mb(v) for k, v in pids.items()}})
    pool.shutdown(wait=True)
    took = time.monotonic() - t0
    rss.append({"t": round(took, 1), **{k: fz.rss_mb(v) for k, v in pids.items()}})
    dead = [p.name for p in stack.procs if p.popen.poll() is not None]
    t1 = time.monotonic()
    idle_s = None
    while time.monotonic() - t1 < 60:
        if all((s := engine_stats(e)).running + s.waiting == 0 for e in stack.engine_addresses):
            idle_s = round(time.monotonic() - t1, 2)
            break
        time.sleep(0.1)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", "engines": a.engines,
        "scale": a.scale, "requests": tally.total, "seconds": round(took, 1),
        "answers": dict(sorted(tally.counts.items())), "bad_answers": len(tally.failures),
        "bad_examples": tally.failures[:20], "slowest_answer_s": round(tally.slowest_s, 2),
        "rss_mb": rss, "rss_growth_mb": {k: round(rss[-1][k] - rss[0][k], 1) for k in pids},
        "dead_processes": dead, "engines_idle_after_s": idle_s,
    }
    out = Path(a.json or f"bench/results/fuzz-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rss_mb", "answers")}, indent=1))
    print(f"wrote {out}")
    http.close()
    channel.close()
    return 0 if not tally.failures and not dead and idle_s is not None else 1


if __name__ == "__main__":
    sys.exit(main())
