"""Where a decode step's device time goes, kernel by kernel: random weights of a real shape, `--seqs` sequences
each at `--context` tokens, then `--steps` decode steps under torch.profiler (eager, so every kernel shows by
name; a CUDA graph replays the same kernels). Prints a table of kernels by total device time per step, grouped
into GEMMs, attention, and the rest, and writes JSON.

    python bench/decode_profile.py --shape llama-3-8b --seqs 256 --context 384
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import SHAPES, write_config  # noqa: E402


def group_of(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "matmul", "splitk", "w4a16", "mma")):
        return "gemm"
    if any(k in n for k in ("paged", "attn", "attention", "decode_kernel", "prefill")):
        return "attention"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=list(SHAPES))
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--context", type=int, default=384)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--quantization", default="none", choices=["none", "fp8", "w4a16"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from folio import LLM, SamplingParams
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(str(write_config(args.shape, Path(tmp), args.quantization)), load_format="dummy",
                  dtype="bfloat16", max_model_len=args.context + 4 * args.steps + 64, max_num_seqs=args.seqs,
                  enforce_eager=True, async_scheduling=False, enable_prefix_caching=False,
                  quantization="fp8" if args.quantization == "fp8" else None)
    engine = llm.engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=4 * args.steps + 16, ignore_eos=True)
    for i in range(args.seqs):
        engine.add_request(f"r{i}", None, params, stream=False,
                           prompt_token_ids=rng.integers(3, engine.vocab_size, args.context).tolist())
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.count:
            rows.append({"kernel": ev.key, "ms_per_step": t / 1e3 / args.steps, "calls_per_step": ev.count / args.steps,
                         "group": group_of(ev.key)})
    rows = [r for r in rows if not r["kernel"].startswith(("cudaLaunch", "cudaMemcpy", "Memcpy", "Memset"))
            or r["group"] != "other"]
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    groups = {g: sum(r["ms_per_step"] for r in rows if r["group"] == g) for g in ("gemm", "attention", "other")}
    print(f"\n{args.shape}, {args.seqs} seqs at context ~{args.context}, {args.quantization}: "
          f"{total:.2f} ms of device time per decode step")
    print("  " + ", ".join(f"{g} {v:.2f} ms ({v / total:.0%})" for g, v in groups.items()))
    print(f"{'ms/step':>9}{'calls':>7}  {'group':<10}kernel")
    for r in rows[:18]:
        print(f"{r['ms_per_step']:>9.3f}{r['calls_per_step']:>7.0f}  {r['group']:<10}{r['kernel'][:110]}")
    rec = {"device": torch.cuda.get_device_name(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python bench/decode_profile.py " + " ".join(sys.argv[1:]), "shape": args.shape,
           "seqs": args.seqs, "context": args.context, "quantization": args.quantization,
           "device_ms_per_step": total, "groups_ms": groups, "kernels": rows[:40]}
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
