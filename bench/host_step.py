"""Host work per engine step at a large decode batch: the tiny random-weight shape, the forward pass replaced
by fixed logits so only the host's part is left (scheduling, inputs, sampling bookkeeping, update).

    python bench/host_step.py --seqs 1024 --steps 40                     # asynchronous scheduling on
    python bench/host_step.py --seqs 1024 --steps 40 --no-async-scheduling
    python bench/host_step.py --seqs 1024 --steps 40 --real-forward      # keep the model's forward

Prints wall and process-CPU milliseconds per decode step and the engine's per-phase host times (see
docs/engine.md, "Host work per step"). On a shared machine the CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import write_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--no-async-scheduling", action="store_true")
    ap.add_argument("--real-forward", action="store_true", help="run the model instead of fixed logits")
    args = ap.parse_args()
    from folio import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(str(write_config("tiny", Path(tmp))), load_format="dummy", dtype="float32", device="cpu",
                  max_model_len=args.prompt_len + args.steps + 64, max_num_seqs=args.seqs,
                  max_num_batched_tokens=16384, async_scheduling=not args.no_async_scheduling)
        engine = llm.engine
        rng = np.random.default_rng(0)
        params = SamplingParams(temperature=0, max_tokens=args.steps + 32, ignore_eos=True)
        for i in range(args.seqs):
            engine.add_request(f"r{i}", None, params, prompt_token_ids=rng.integers(3, 1000, args.prompt_len).tolist(),
                               stream=False)
        while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                              for s in engine.scheduler.running):
            engine.step()  # every prompt computed: what follows is decode only
        engine.step()
        if not args.real_forward:
            fixed = torch.randn(args.seqs, engine.vocab_size)
            engine.runner.execute = lambda inputs: fixed[:inputs.logit_rows.shape[0]]
        engine.step_timing = {}
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            engine.step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        timing = dict(engine.step_timing)
        steps = timing.pop("steps")
        print(f"{args.seqs} sequences, async scheduling {'off' if args.no_async_scheduling else 'on'}, "
              f"{'real' if args.real_forward else 'fixed-logits'} forward: {1e3 * wall / steps:.2f} ms/step wall, "
              f"{1e3 * cpu / steps:.2f} ms/step CPU; phases (ms/step): "
              + ", ".join(f"{k} {1e3 * v / steps:.2f}" for k, v in timing.items()))


if __name__ == "__main__":
    main()
