"""Host work per engine step at a large decode batch: a random-weight shape (tiny by default), the forward pass
replaced by fixed logits so only the host's part is left (scheduling, inputs, sampling bookkeeping, update).

    python bench/host_step.py --seqs 256 1024 --steps 40                   # asynchronous scheduling on
    python bench/host_step.py --seqs 1024 --steps 40 --no-async-scheduling
    python bench/host_step.py --seqs 1024 --steps 40 --real-forward        # keep the model's forward
    python bench/host_step.py --seqs 1024 --profile                        # where the time goes, per function
    python bench/host_step.py --seqs 256 1024 --device cuda --shape llama-3.2-1b --real-forward --profile

Prints wall and process-CPU milliseconds per decode step and the engine's per-phase host times (see
docs/engine.md, "Host work per step"). On a shared machine the CPU time is the steadier figure; torch's own
threads (the CPU sampler's log-softmax and argmax) count in it too, so `--threads 1` (the default) keeps them
on one. `--profile` runs the timed steps again under cProfile and prints the functions with the most own
time in milliseconds per step (cProfile slows Python calls, so read it for proportions). `--json` appends one
record per run to a JSON-lines file (bench/results/host_step.jsonl by default).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import write_config  # noqa: E402


def build(args, seqs: int, tmp: Path):
    """An engine with `seqs` sequences, every prompt computed (what follows is decode only)."""
    from folio import LLM, SamplingParams

    device = args.device
    llm = LLM(str(write_config(args.shape, tmp)), load_format="dummy",
              dtype="float32" if device == "cpu" else "bfloat16", device=device,
              max_model_len=args.prompt_len + 2 * args.steps + 64, max_num_seqs=seqs,
              max_num_batched_tokens=16384, async_scheduling=not args.no_async_scheduling,
              enable_prefix_caching=args.prefix_caching, gpu_memory_utilization=0.8)
    engine = llm.engine
    rng = np.random.default_rng(0)
    vocab = engine.vocab_size
    params = SamplingParams(temperature=0, max_tokens=2 * args.steps + 32, ignore_eos=True)
    for i in range(seqs):
        engine.add_request(f"r{i}", None, params, prompt_token_ids=rng.integers(3, vocab, args.prompt_len).tolist(),
                           stream=False)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                          for s in engine.scheduler.running):
        engine.step()
    engine.step()
    if not args.real_forward:
        fixed = torch.randn(seqs, vocab, device=engine.device)
        engine.runner.execute = lambda inputs: fixed[:inputs.logit_rows.shape[0]]
    return llm, engine


def sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def timed(engine, steps: int) -> dict:
    engine.step_timing = {}
    steady = engine.scheduler.num_steady_steps
    sync(engine)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        engine.step()
    sync(engine)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steady = engine.scheduler.num_steady_steps - steady
    timing = dict(engine.step_timing)
    n = timing.pop("steps")
    engine.step_timing = None
    phases = {k: 1e3 * v / n for k, v in timing.items()}
    return {"steps": n, "steady_steps": steady, "wall_ms_per_step": 1e3 * wall / n, "cpu_ms_per_step": 1e3 * cpu / n,
            "host_ms_per_step": sum(v for k, v in phases.items() if k != "wait"), "phases_ms_per_step": phases}


def profiled(engine, steps: int, top: int) -> list[dict]:
    """The `top` functions by own time under cProfile, in ms per step."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    sync(engine)
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (prim calls, calls, own s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(f).name}:{line}({name})", "calls_per_step": c / steps,
             "own_ms_per_step": 1e3 * tt / steps, "cum_ms_per_step": 1e3 * ct / steps}
            for (f, line, name), (_, c, tt, ct, _) in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--shape", default="tiny", help="a shape of bench/throughput.py (random weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--no-async-scheduling", action="store_true")
    ap.add_argument("--prefix-caching", action="store_true", help="enable_prefix_caching (off, as in throughput.py)")
    ap.add_argument("--real-forward", action="store_true", help="run the model instead of fixed logits")
    ap.add_argument("--profile", action="store_true", help="also run the steps under cProfile and print the top")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--label", default="", help="a name for the code measured (e.g. before / after)")
    ap.add_argument("--json", nargs="?", const=str(Path(__file__).parent / "results" / "host_step.jsonl"),
                    default=None, help="append one record per run to this JSON-lines file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for seqs in args.seqs:
        with tempfile.TemporaryDirectory() as tmp:
            llm, engine = build(args, seqs, Path(tmp))
            rec = timed(engine, args.steps)
            print(f"{seqs} sequences, async scheduling {'off' if args.no_async_scheduling else 'on'}, "
                  f"{'real' if args.real_forward else 'fixed-logits'} forward on {args.device}: "
                  f"{rec['wall_ms_per_step']:.2f} ms/step wall, {rec['cpu_ms_per_step']:.2f} ms/step CPU, "
                  f"host {rec['host_ms_per_step']:.2f} ms/step ({rec['steady_steps']} steps from the steady "
                  f"batch); phases (ms/step): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in rec["phases_ms_per_step"].items()), flush=True)
            if args.profile:
                rec["profile"] = profiled(engine, args.steps, args.top)
                print(f"{'function':<60}{'calls/step':>11}{'own ms/step':>13}{'cum ms/step':>13}")
                for r in rec["profile"]:
                    print(f"{r['function'][-59:]:<60}{r['calls_per_step']:>11.0f}{r['own_ms_per_step']:>13.3f}"
                          f"{r['cum_ms_per_step']:>13.3f}")
            llm.shutdown()
            del llm, engine
        if args.json:
            rec.update(label=args.label, seqs=seqs, shape=args.shape, device=args.device,
                       async_scheduling=not args.no_async_scheduling, real_forward=args.real_forward,
                       prefix_caching=args.prefix_caching, threads=args.threads,
                       date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       command="python bench/host_step.py " + " ".join(sys.argv[1:]))
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
