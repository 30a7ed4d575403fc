"""Accuracy of each weight-quantization format on the bundled SmolLM2-135M (real weights), on CPU: the mean
absolute difference of prompt logprobs against the float32 model, over a fixed text of >= 2,000 tokens.

    python bench/quant_accuracy_cpu.py [--text FILE] [--json bench/results/quant_accuracy_cpu_<date>.json]

Each checkpoint is written by tests/quantization/quantizer.py (round-to-nearest with min/max scales: the
*format's* cost, not what GPTQ's or AWQ's calibration would recover), loaded by Folio by its config.json,
and run through the CPU reference path (FP8 activations are not quantized there: weight error only).
The default text is the one bench/fp8_kv.py measures the FP8 KV cache on (Python's own language-reference
topics, pydoc_data, sorted), so the two tables in docs/quantization.md compare; its SHA-256 is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from folio import LLM, SamplingParams  # noqa: E402
from services.common.bundled_model import ensure_bundled_model  # noqa: E402
from tests.quantization import quantizer as qz  # noqa: E402

GROUP = 64  # divides SmolLM2's 576 and 1536 (128 does not divide 576)
SCHEMES = {
    "gptq-4bit-g64-sym": lambda s: qz.gptq(s, GROUP, sym=True, desc_act=False),
    "gptq-4bit-g64-asym": lambda s: qz.gptq(s, GROUP, sym=False, desc_act=False),
    "awq-4bit-g64": lambda s: qz.awq(s, GROUP),
    "ct-w4a16-g64-sym": lambda s: qz.compressed_int4(s, GROUP, sym=True),
    "ct-w4a16-channel-sym": lambda s: qz.compressed_int4(s, -1, sym=True),
    "fp8-per-tensor": lambda s: qz.fp8_vllm(s, static=False),
    "fbgemm-fp8-per-channel": qz.fbgemm,
}


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def prompt_logprobs(model_dir: Path, ids: list[int], **kw) -> torch.Tensor:
    llm = LLM(str(model_dir), dtype="float32", device="cpu", max_model_len=len(ids) + 8, enable_prefix_caching=False,
              **kw)
    try:
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
    finally:
        llm.shutdown()
    return torch.tensor([float(e[ids[i]].logprob) for i, e in enumerate(out.prompt_logprobs) if e is not None])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    src = ensure_bundled_model(quiet=True)
    from tokenizers import Tokenizer

    text = Path(args.text).read_text() if args.text else default_text()
    ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(text).ids[:args.tokens]
    if len(ids) < args.tokens:
        raise SystemExit(f"the text has only {len(ids)} tokens; pass a longer --text")
    t0 = time.time()
    base = prompt_logprobs(src, ids)
    state = load_file(str(src / "model.safetensors"))
    rows = [{"scheme": "float32", "mean_abs_dlogprob": 0.0, "max_abs_dlogprob": 0.0}]
    rows.append({"scheme": "fp8 at load (quantization='fp8')", **compare(base, prompt_logprobs(src, ids,
                                                                                               quantization="fp8"))})
    for name, make in SCHEMES.items():
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            for f in src.iterdir():
                if f.suffix != ".safetensors":
                    shutil.copy(f, d / f.name)
            tensors, qc, _ = make(dict(state))
            qz.write(d, tensors, qc)
            rows.append({"scheme": name, **compare(base, prompt_logprobs(d, ids))})
        print(f"{rows[-1]['scheme']:<34} mean |dlogprob| {rows[-1]['mean_abs_dlogprob']:.4f}", flush=True)
    result = {"date": datetime.date.today().isoformat(), "model": "SmolLM2-135M-Instruct (bundled)",
              "tokens": len(ids), "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
              "baseline_mean_logprob": base.mean().item(), "rows": rows, "seconds": round(time.time() - t0, 1)}
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"quant_accuracy_cpu_{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'scheme':<34}{'mean |dlogprob|':>16}{'max':>8}")
    for r in rows:
        print(f"{r['scheme']:<34}{r['mean_abs_dlogprob']:>16.4f}{r['max_abs_dlogprob']:>8.3f}")
    print(f"{len(ids)} tokens; float32 mean logprob {result['baseline_mean_logprob']:.3f}; wrote {path}")
    return 0


def compare(base: torch.Tensor, got: torch.Tensor) -> dict:
    d = (got - base).abs()
    return {"mean_abs_dlogprob": d.mean().item(), "max_abs_dlogprob": d.max().item()}


if __name__ == "__main__":
    sys.exit(main())
