"""Offline throughput on this CPU: the same prompts through Folio's LLM.generate and transformers' batched
`generate`, on the bundled model, in one run. Prints a table and writes JSON to bench/results/.

    .venv/bin/python bench/offline_cpu.py [--prompts 32] [--max-tokens 64] [--hf-batch 32]
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

from folio import LLM, SamplingParams  # noqa: E402
from services.common.bundled_model import ensure_bundled_model  # noqa: E402

TOPICS = ["the ocean", "a city at night", "machine learning", "the history of Rome", "coffee", "mountains",
          "a robot learning to paint", "the stock market"]
FORMS = ["Write a short story about", "Explain to a child", "List facts about", "Write a poem about"]


def make_prompts(n: int) -> list[str]:
    return [f"{FORMS[i % len(FORMS)]} {TOPICS[(i // len(FORMS)) % len(TOPICS)]}." + " Please be detailed." * (i % 3)
            for i in range(n)]


def run_folio(prompts, max_tokens):
    llm = LLM(dtype="float32")
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt_s = time.perf_counter() - t
    return sum(len(o.outputs[0].token_ids) for o in outs), dt_s, outs


def run_hf(prompts, max_tokens, batch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_bundled_model(quiet=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    n_out, t = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        n_out += (out.shape[1] - enc.input_ids.shape[1]) * out.shape[0]
    return n_out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    prompts = make_prompts(args.prompts)

    f_tokens, f_s, _ = run_folio(prompts, args.max_tokens)
    h_tokens, h_s = run_hf(prompts, args.max_tokens, args.hf_batch)
    folio_tps, hf_tps = f_tokens / f_s, h_tokens / h_s
    rows = [("folio LLM.generate", f_tokens, f_s, folio_tps), ("transformers generate", h_tokens, h_s, hf_tps)]
    print(f"\n{'engine':<24}{'out tokens':>12}{'seconds':>10}{'tok/s':>10}")
    for name, n, s, tps in rows:
        print(f"{name:<24}{n:>12}{s:>10.2f}{tps:>10.1f}")
    print(f"ratio folio / transformers: {folio_tps / hf_tps:.2f}x")

    record = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__})",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/offline_cpu.py " + " ".join(sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (bundled, float32)",
        "workload": {"prompts": args.prompts, "max_tokens": args.max_tokens, "ignore_eos": True,
                     "hf_batch": args.hf_batch},
        "folio_output_tok_s": folio_tps, "hf_output_tok_s": hf_tps, "ratio": folio_tps / hf_tps,
        "folio_seconds": f_s, "hf_seconds": h_s,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"offline_cpu_{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
