"""Chaos run: mixed streaming load on a real 2-engine stack (two router replicas) with a fault every --every-s seconds.

Faults cycle through engine SIGKILL (restarted on its port), engine SIGSTOP for 20 s, Redis restart,
tokenizer restart and router restart (clients alternate between the two replicas). Every request is
greedy and compared with the offline reference (tests/chaos/harness.py). Writes
bench/results/chaos-<date>.json. The issue's long run: --duration-s 600 --every-s 30.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from folio.stack import Stack, StackConfig  # noqa: E402
from tests.chaos import harness as h  # noqa: E402
from tests.integration.helpers import engine_stats  # noqa: E402

ENGINE = ["--num-kv-blocks", "64", "--max-model-len", "512", "--dtype", "float32", "--device", "cpu"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=600)
    ap.add_argument("--every-s", type=float, default=30)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--faults", default=",".join(h.FAULTS), help="comma-separated, cycled in order")
    a = ap.parse_args()
    from folio import LLM

    expected = h.reference(LLM(num_kv_blocks=64, max_model_len=512, dtype="float32", device="cpu"))
    stack = Stack(StackConfig(engines=2, router_port=0, engine_args=ENGINE, env={"OMP_NUM_THREADS": "1"},
                              router_args=["--hung-after-s", "4"],
                              log_dir=Path(tempfile.mkdtemp(prefix="folio-chaos-")))).start()
    faults, log = a.faults.split(","), []
    try:
        router2 = h.add_router(stack)
        load = h.Load([stack.router_address, router2.address], expected, workers=a.workers).start()
        t0 = time.monotonic()
        k = 0
        while time.monotonic() - t0 < a.duration_s:
            time.sleep(max(0.0, t0 + (k + 1) * a.every_s - time.monotonic()))
            if time.monotonic() - t0 >= a.duration_s:
                break
            name = faults[k % len(faults)]
            before = dict(load.tally.counts)
            t = time.monotonic()
            h.FAULTS[name](stack)
            log.append({"at_s": round(t - t0, 1), "fault": name, "took_s": round(time.monotonic() - t, 1),
                        "counts_before": before})
            print(f"{t - t0:6.1f}s {name} ({time.monotonic() - t:.1f}s) {dict(load.tally.counts)}", flush=True)
            k += 1
        load.stop()
        elapsed = time.monotonic() - t0
        idle = [engine_stats(addr) for addr in stack.engine_addresses]
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(elapsed, 1), "every_s": a.every_s, "workers": a.workers,
            "counts": dict(load.tally.counts), "slowest_s": round(load.tally.slowest_s, 2),
            "faults": log, "details": load.tally.details,
            "engines_after": [{"running": s.running, "waiting": s.waiting} for s in idle],
            "load_average": os.getloadavg(), "log_dir": str(stack.log_dir),
        }
    finally:
        stack.stop()
    out = Path(__file__).parent / "results" / f"chaos-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("duration_s", "counts", "slowest_s", "engines_after")}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
