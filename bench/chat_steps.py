"""The 8B chat's steps A/B'd on one engine, arms alternating: whole steps replayed from their CUDA graphs.

A chat run moves 1-2% from run to run, more than a change worth ~0.1-0.2 ms a step, so this times the steps
themselves: one random-weight engine of the 8B shape (max_model_len 2,064 as the chat run's), graphs captured only
for the buckets of the steps below, re-captured for each arm (an arm sets the environment the change reads), arms
alternated ROUNDS times. First each arm's logits for every step, against the first arm's (max |diff|, argmax
agreement, the smallest gap between a row's top two logits: a greedy token can change where they are that close);
then device ms per step (median of --iters, a GPU sleep in front so the host's launch is hidden), per arm and round.

The arms: the prefill pick of mixed steps under 1,024 tokens (FOLIO_PREFILL_PREFIX_PICK=base: BASE's tiles walking
the chunk list, session 8's; unset: 64 x 32 tiles walking it, session 9's). Mixed steps (decodes at contexts
200-1,200 beside fresh prompts) replay mixed graphs, where the pick applies. Decode steps at 1-64 sequences (contexts
200-1,800) run the same kernels in both arms: their ratio is the A/B's noise floor. Each step has its own blocks, so
no step reads KV another one wrote. Session 9's round 2 ran a second lever in the second arm, the decode split merge
inside the attention kernel (measured slower at every batch, removed; docs/kernels.md).

    python bench/chat_steps.py --out bench/results/chat_steps.json       # ~50 s on an H200
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.chat_profile import device_ms  # noqa: E402
from bench.mixed_graphs import step_inputs_from  # noqa: E402
from bench.throughput import write_config  # noqa: E402

ARMS = {  # name -> environment (None: unset)
    "base": {"FOLIO_PREFILL_PREFIX_PICK": "base"},
    "tiles64": {"FOLIO_PREFILL_PREFIX_PICK": None},
}
MAX_MODEL_LEN = 2064  # bench/throughput.py's chat run: the longest prompt + output + 16


def chat_steps(seed: int = 3) -> dict[str, list[tuple[int, int]]]:
    """name -> [(new tokens, context incl. them)] per sequence."""
    rng = np.random.default_rng(seed)
    dec = lambda n, lo=200, hi=1200: [(1, int(c)) for c in rng.integers(lo, hi, n)]  # noqa: E731
    return {
        "mixed 254 dec + 343 prompt": dec(254) + [(343, 343)],  # the chat's mean mixed step
        "mixed 250 dec + 120, 600": dec(250) + [(120, 120), (600, 600)],
        "mixed 60 dec + 900 prompt": dec(60) + [(900, 900)],
        "mixed 200 dec + 100 prompt": dec(200) + [(100, 100)],
        "decode 1": dec(1, 200, 1800),
        "decode 4": dec(4, 200, 1800),
        "decode 16": dec(16, 200, 1800),
        "decode 48": dec(48, 200, 1800),
        "decode 64": dec(64, 200, 1800),
    }


def buckets(steps: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The decode batch buckets and mixed token buckets (multiples of 16) the steps replay."""
    dec = sorted({len(lens) for lens in steps.values() if all(n == 1 for n, _ in lens)})
    mix = sorted({-(-sum(n for n, _ in lens) // 16) * 16 for lens in steps.values() if any(n > 1 for n, _ in lens)})
    return tuple(dec), tuple(mix)


def set_arm(env: dict) -> None:
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def recapture(llm, dec_max: int, mix_max: int) -> float:
    runner = llm.engine.runner
    t0 = time.perf_counter()
    runner.graphs = None
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
    runner.capture_decode_graphs(dec_max, MAX_MODEL_LEN)
    runner.capture_mixed_graphs(mix_max, 256, MAX_MODEL_LEN)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="times each arm is captured and timed, alternating")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds after the engine is up; rounds stop there")
    ap.add_argument("--smoke", action="store_true", help="the tiny shape on the CPU, eagerly (checks the script runs)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "chat_steps.json"))
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/chat_steps.py needs a CUDA GPU (or --smoke)")
    from folio import LLM
    from services.engine import cuda_graphs

    t0 = time.perf_counter()
    steps = chat_steps()
    if args.smoke:
        steps = {k: [(min(n, 24), min(c, 40)) for n, c in v[-4:]] for k, v in steps.items()}
    dec_b, mix_b = buckets(steps)
    cuda_graphs.DECODE_BUCKETS, cuda_graphs.MIXED_BUCKETS = dec_b, mix_b  # only these graphs: fast captures
    first_arm = next(iter(ARMS))
    set_arm(ARMS[first_arm])
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(str(write_config("tiny" if args.smoke else "llama-3-8b", Path(tmp))), load_format="dummy",
                  dtype="float32" if args.smoke else "bfloat16", device="cpu" if args.smoke else "cuda",
                  max_model_len=MAX_MODEL_LEN, max_num_seqs=256, enable_prefix_caching=False,
                  async_scheduling=False, max_mixed_graph_tokens=mix_b[-1])
    runner = llm.engine.runner
    print(f"engine up at {time.perf_counter() - t0:.1f} s; graphs: decode {dec_b}, mixed {mix_b}", flush=True)
    inputs, block = {}, 0
    for i, (name, lens) in enumerate(steps.items()):
        inputs[name], block = step_inputs_from(runner, lens, block, seed=i)
    t_end = time.perf_counter() + args.budget
    rec = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "device": "cpu" if args.smoke else torch.cuda.get_device_name(),
           "command": "python bench/chat_steps.py " + " ".join(sys.argv[1:]), "arms": ARMS,
           "logits": {}, "ms": {arm: {name: [] for name in steps} for arm in ARMS}, "capture_s": []}
    ref_logits = {}
    for rnd in range(args.rounds):
        for arm, env in ARMS.items():
            if time.perf_counter() > t_end:
                break
            set_arm(env)
            rec["capture_s"].append(recapture(llm, dec_b[-1], mix_b[-1]))
            with torch.inference_mode():
                if rnd == 0:  # each arm's logits against the first arm's, before any timing
                    for name, inp in inputs.items():
                        logits = runner.execute(inp).float()
                        if arm == first_arm:
                            ref_logits[name] = logits
                            continue
                        ref = ref_logits[name]
                        top2 = ref.topk(2, dim=-1).values
                        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
                        rec["logits"].setdefault(arm, {})[name] = dict(
                            max_abs_diff=(logits - ref).abs().max().item(), argmax_agreement=agree,
                            min_top2_gap=(top2[:, 0] - top2[:, 1]).min().item(), bitwise_equal=bool(torch.equal(logits, ref)))
                        r = rec["logits"][arm][name]
                        print(f"logits {arm} vs {first_arm}, {name}: max |diff| {r['max_abs_diff']:.4f}, argmax "
                              f"agreement {agree:.3f}, bitwise equal {r['bitwise_equal']}", flush=True)
                for name, inp in inputs.items():
                    rec["ms"][arm][name].append(device_ms(runner, inp, args.iters))
            print(f"round {rnd} {arm}: " + ", ".join(f"{n.split(' ', 1)[0][0]}{n.split(' ', 2)[1]} "
                                                      f"{rec['ms'][arm][n][-1]:.3f}" for n in steps), flush=True)
    print(f"\n{'step (ms, median over rounds)':<32}" + "".join(f"{a:>16}" for a in ARMS) + f"{'ratio':>8}")
    arms = list(ARMS)
    rec["summary"] = {}
    for name in steps:
        med = [float(np.median(rec["ms"][a][name])) if rec["ms"][a][name] else float("nan") for a in arms]
        rec["summary"][name] = dict(zip(arms, med), ratio=med[1] / med[0])
        print(f"{name:<32}" + "".join(f"{m:>16.3f}" for m in med) + f"{med[1] / med[0]:>8.3f}", flush=True)
    rec["wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=1))
    print(f"wrote {args.out} ({rec['wall_s']:.1f} s)")


if __name__ == "__main__":
    main()
