"""KV memory efficiency on the bundled model (CPU is fine): the vLLM paper's sharing measurement and KV waste.

Sharing (paper section 6.3, Fig. 15): for parallel sampling n = 2, 4, 6 and beam width 2, 4, 6 over a prompt
set, sample after every engine step
  with    = distinct KV blocks referenced by live sequences (a shared block counts once),
  without = blocks the same sequences would hold if each kept its own copy of all its blocks,
and report saved = 1 - sum(with) / sum(without) over the run. Prefix caching is off here so that only
forking (n > 1, beams) shares; what is measured is the block manager's real tables, not a model of them.

Waste (paper section 6, "under 4%"): a continuous-batching run of requests with varied prompt and output
lengths; after every step, waste = allocated slots not holding a computed token / allocated slots, averaged
over steps. Beside it, the waste of reserving prompt + max_tokens slots per request up front (what a
system without paging must do) on the same run.

    .venv/bin/python bench/memory.py [--max-tokens 64] [--prompts 8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from folio import LLM, BeamSearchParams, SamplingParams  # noqa: E402

PAPER = {"parallel_sampling_saved_pct": [6.1, 9.8], "beam_search_saved_pct": [37.6, 55.2], "waste_pct_below": 4.0}
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain to a child why the sky is blue.",
    "List five facts about the history of Rome and explain why each one mattered.",
    "Write a poem about coffee on a rainy morning.",
    "Describe how a neural network learns, step by step, for a curious high-school student.",
    "What are the pros and cons of living in a big city?",
    "Summarize the plot of a heist movie you would like to see, with three twists.",
    "Give advice to someone starting to learn the piano as an adult.",
    "Translate to French: The weather is lovely today and we are going to the beach after lunch.",
    "Compare trains and planes for travelling across Europe.",
    "Why do cats purr? Give the main scientific explanations.",
    "Write a recipe for a simple vegetable soup.",
]


class Sampler:
    """Reads the block manager after each step: distinct blocks used vs per-sequence copies, and slot use."""

    def __init__(self, engine):
        self.engine = engine
        self.with_sharing = 0
        self.without_sharing = 0
        self.waste_fracs: list[float] = []
        self.reserved_waste_fracs: list[float] = []
        self.steps = 0

    def sample(self) -> None:
        bm = self.engine.blocks
        bs = bm.block_size
        live = [s for s in self.engine.scheduler.running if s.seq_id in bm.tables]
        if not live:
            return
        self.steps += 1
        self.with_sharing += bm.num_used_blocks()
        self.without_sharing += sum(bm.num_held_blocks(s.seq_id) for s in live)
        filled: dict[int, int] = {}  # block id -> slots holding a computed token (shared blocks once)
        for s in live:
            for i, b in enumerate(bm.block_ids(s.seq_id)):
                filled[b] = max(filled.get(b, 0), min(bs, max(0, s.num_computed_tokens - i * bs)))
        allocated = len(filled) * bs
        self.waste_fracs.append(1 - sum(filled.values()) / allocated)
        # Without paging: each request reserves prompt + max_tokens slots when it starts.
        reserved = sum(s.num_prompt_tokens + s.params.max_tokens for s in live)
        self.reserved_waste_fracs.append(1 - sum(s.num_computed_tokens for s in live) / reserved)


def drive(llm: LLM, items: list[tuple[list[int], object]]) -> Sampler:
    engine = llm.engine
    sampler = Sampler(engine)
    for i, (ids, params) in enumerate(items):
        engine.add_request(f"mem-{i}-{time.monotonic_ns()}", None, params, prompt_token_ids=ids)
    while engine.has_unfinished_requests():
        engine.step()
        sampler.sample()
    engine.blocks.check_invariants()
    assert engine.blocks.num_used_blocks() == 0
    return sampler


def pct(x: float) -> float:
    return round(100 * x, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per sharing run")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per sequence in sharing runs")
    ap.add_argument("--batch-requests", type=int, default=24, help="requests in the waste run")
    ap.add_argument("--batch-max-tokens", type=int, default=128, help="longest output in the waste run")
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    llm = LLM(dtype="float32", block_size=args.block_size, enable_prefix_caching=False,
              cpu_kv_cache_bytes=256 << 20, max_model_len=1024, max_num_seqs=64)
    tok = llm.get_tokenizer()
    prompt_ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS[:args.prompts]]
    t0 = time.perf_counter()

    sharing = []
    for kind, widths in (("parallel sampling", (2, 4, 6)), ("beam search", (2, 4, 6))):
        for w in widths:
            if kind == "parallel sampling":
                params = SamplingParams(n=w, temperature=1.0, seed=w, max_tokens=args.max_tokens, ignore_eos=True)
            else:
                params = BeamSearchParams(beam_width=w, max_tokens=args.max_tokens, ignore_eos=True)
            t = time.perf_counter()
            s = drive(llm, [(ids, params) for ids in prompt_ids])
            saved = 1 - s.with_sharing / s.without_sharing
            sharing.append({"kind": kind, "width": w, "saved_pct": pct(saved), "steps": s.steps,
                            "avg_blocks_with_sharing": round(s.with_sharing / s.steps, 1),
                            "avg_blocks_without_sharing": round(s.without_sharing / s.steps, 1),
                            "seconds": round(time.perf_counter() - t, 1)})
            print(f"  {kind} {w}: saved {sharing[-1]['saved_pct']}% ({sharing[-1]['seconds']} s)", flush=True)

    # Continuous batching: requests of varied prompt and output lengths, at most 8 running at once.
    batch_llm = LLM(dtype="float32", block_size=args.block_size, enable_prefix_caching=False,
                    cpu_kv_cache_bytes=256 << 20, max_model_len=1024, max_num_seqs=8)
    items = []
    for i in range(args.batch_requests):
        ids = tok.encode_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        items.append((ids, SamplingParams(temperature=0, max_tokens=16 + (i * 37) % (args.batch_max_tokens - 15), ignore_eos=True)))
    t = time.perf_counter()
    s = drive(batch_llm, items)
    waste = {"block_size": args.block_size, "requests": args.batch_requests, "max_num_seqs": 8, "steps": s.steps,
             "output_tokens": f"16-{args.batch_max_tokens}",
             "waste_pct": pct(sum(s.waste_fracs) / len(s.waste_fracs)),
             "max_waste_pct": pct(max(s.waste_fracs)),
             "reserve_prompt_plus_max_tokens_waste_pct": pct(sum(s.reserved_waste_fracs) / len(s.reserved_waste_fracs)),
             "seconds": round(time.perf_counter() - t, 1)}

    print(f"\nKV memory on the bundled model ({args.prompts} chat prompts, {args.max_tokens} tokens per sequence, "
          f"block size {args.block_size}, CPU)")
    print(f"{'workload':<22}{'width':>6}{'blocks w/o sharing':>20}{'with sharing':>14}{'saved':>8}   paper")
    for r in sharing:
        ref = PAPER["parallel_sampling_saved_pct"] if r["kind"] == "parallel sampling" else PAPER["beam_search_saved_pct"]
        print(f"{r['kind']:<22}{r['width']:>6}{r['avg_blocks_without_sharing']:>20}{r['avg_blocks_with_sharing']:>14}"
              f"{r['saved_pct']:>7}%   {ref[0]}-{ref[1]}%")
    print(f"\nKV waste, continuous batching ({args.batch_requests} requests, <= 8 running, {s.steps} steps): "
          f"{waste['waste_pct']}% of allocated slots hold no token (max {waste['max_waste_pct']}%); "
          f"paper: under {PAPER['waste_pct_below']}%. Reserving prompt + max_tokens up front: "
          f"{waste['reserve_prompt_plus_max_tokens_waste_pct']}%.")

    result = {
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__})",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/memory.py " + " ".join(sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (bundled, float32)",
        "workload": {"prompts": args.prompts, "max_tokens": args.max_tokens, "ignore_eos": True,
                     "prompt_tokens": [len(p) for p in prompt_ids], "block_size": args.block_size,
                     "prefix_caching": False},
        "sharing": sharing,
        "waste": waste,
        "paper": PAPER,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(__file__).resolve().parent / "results" / f"memory_{dt.date.today().isoformat()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
