"""What the gRPC hops cost: the same concurrent greedy requests in-process and through the local stack, on CPU.

    python bench/stack_cpu.py [--requests 32] [--max-tokens 32] [--threads 1] [--out bench/results/...json]

In-process: one LLMEngine in this process, every request added at t0, stepped to completion; each
token's time is when `step()` returned it. Through the stack: Redis, tokenizer, one engine and the
router as processes (folio.stack), the same requests sent at t0 as concurrent router streams (text
in, text deltas out); each token's time is when the client received it. Both use the same engine
settings and the same number of torch threads, and the outputs are checked to be the same tokens.
Reported: output tokens/s, time to first token (TTFT) and time per output token after the first
(TPOT), p50 and p99 over requests, and the difference the hops make. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOPICS = ["the ocean", "a city at night", "mountains", "a library", "coffee", "winter", "trains", "the moon",
          "a garden", "robots", "the desert", "music", "rain", "a market", "bridges", "forests"]


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]}, part {i // len(TOPICS) + 1}:" for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(token_times: dict[str, list[float]], t0: float, t_end: float) -> dict:
    ttft = [ts[0] - t0 for ts in token_times.values()]
    tpot = [(ts[-1] - ts[0]) / (len(ts) - 1) for ts in token_times.values() if len(ts) > 1]
    total = sum(len(ts) for ts in token_times.values())
    return {"output_tokens": total, "wall_s": t_end - t0, "output_tokens_per_s": total / (t_end - t0),
            "ttft_ms": {"p50": 1000 * pct(ttft, 0.5), "p99": 1000 * pct(ttft, 0.99), "mean": 1000 * statistics.mean(ttft)},
            "tpot_ms": {"p50": 1000 * pct(tpot, 0.5), "p99": 1000 * pct(tpot, 0.99), "mean": 1000 * statistics.mean(tpot)}}


def engine_flags(args) -> dict:
    return {"num_kv_blocks": args.kv_blocks, "max_model_len": 1024, "dtype": "float32", "device": "cpu",
            "max_num_seqs": 256}


def run_in_process(args, texts: list[str]) -> tuple[dict, dict[str, list[int]]]:
    import torch

    from services.engine.engine import EngineConfig, LLMEngine
    from services.common.sampling_params import SamplingParams

    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(**engine_flags(args)))
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    engine.add_request("warmup", "Hello", SamplingParams(temperature=0, max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step()
    times: dict[str, list[float]] = {}
    ids: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    for i, text in enumerate(texts):
        engine.add_request(f"r{i}", text, sp)
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for d in outs:  # token deltas: stamp each new token of the first sequence
            new = [t for s in d.sequences if s.index == 0 for t in s.token_ids]
            times.setdefault(d.request_id, []).extend([now] * len(new))
            ids.setdefault(d.request_id, []).extend(new)
    t_end = time.perf_counter()
    return summarize(times, t0, t_end), ids


async def _stream(stub, pb, common_pb2, rid: str, text: str, max_tokens: int, times, ids) -> None:
    req = pb.GenerateRequest(request_id=rid, text=text,
                             params=common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    ts, got = [], []
    async for m in stub.Generate(req, timeout=600):
        now = time.perf_counter()
        for c in m.choices:
            ts.extend([now] * len(c.token_ids))
            got.extend(c.token_ids)
    times[rid] = ts
    ids[rid] = got


async def run_stack_requests(address: str, texts: list[str], max_tokens: int) -> tuple[dict, dict[str, list[int]]]:
    import grpc

    from protos.gen.folio.v1 import common_pb2, router_pb2 as pb, router_pb2_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        await _stream(stub, pb, common_pb2, "warmup", "Hello", 4, {}, {})
        times: dict[str, list[float]] = {}
        ids: dict[str, list[int]] = {}
        t0 = time.perf_counter()
        await asyncio.gather(*[_stream(stub, pb, common_pb2, f"r{i}", t, max_tokens, times, ids)
                               for i, t in enumerate(texts)])
        t_end = time.perf_counter()
    return summarize(times, t0, t_end), ids


def run_stack(args, texts: list[str]) -> tuple[dict, dict[str, list[int]]]:
    from folio.stack import Stack, StackConfig
    from protos.generate import ensure_generated

    ensure_generated()
    flags = []
    for k, v in engine_flags(args).items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    stack = Stack(StackConfig(engines=1, router_port=0, engine_args=flags, log_level="WARNING",
                              env={"OMP_NUM_THREADS": str(args.threads)}))
    stack.start()
    try:
        return asyncio.run(run_stack_requests(stack.router_address, texts, args.max_tokens))
    finally:
        stack.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of the engine in both runs")
    ap.add_argument("--kv-blocks", type=int, default=256)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/stack_cpu-<date>.json)")
    args = ap.parse_args()
    texts = prompts(args.requests)
    load_before = os.getloadavg()
    inproc, ids_a = run_in_process(args, texts)
    print(f"in-process: {inproc['output_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    stack, ids_b = run_stack(args, texts)
    print(f"gRPC stack: {stack['output_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    same = all(ids_a[k] == ids_b.get(k) for k in ids_a)
    result = {
        "benchmark": "stack_cpu", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "config": {"model": "SmolLM2-135M-Instruct (bundled, float32)", "requests": args.requests,
                   "max_tokens": args.max_tokens, "greedy": True, "ignore_eos": True, "threads": args.threads,
                   "engine": engine_flags(args)},
        "same_tokens": same,
        "in_process": inproc,
        "grpc_stack": stack,
        "hops_add": {
            "ttft_ms": {q: stack["ttft_ms"][q] - inproc["ttft_ms"][q] for q in ("p50", "p99")},
            "tpot_ms": {q: stack["tpot_ms"][q] - inproc["tpot_ms"][q] for q in ("p50", "p99")},
            "throughput_ratio": stack["output_tokens_per_s"] / inproc["output_tokens_per_s"],
        },
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"stack_cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    h = result["hops_add"]
    print(f"{'':12} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}  (ms)")
    for name, r in (("in-process", inproc), ("gRPC stack", stack)):
        print(f"{name:12} {r['output_tokens_per_s']:8.1f} {r['ttft_ms']['p50']:9.1f} {r['ttft_ms']['p99']:9.1f} "
              f"{r['tpot_ms']['p50']:9.2f} {r['tpot_ms']['p99']:9.2f}")
    print(f"{'hops add':12} {'':>8} {h['ttft_ms']['p50']:9.1f} {h['ttft_ms']['p99']:9.1f} "
          f"{h['tpot_ms']['p50']:9.2f} {h['tpot_ms']['p99']:9.2f}   same tokens: {same}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
