"""bf16 on the GPU: Folio against transformers on random-weight models of several architectures at a
realistic small shape (greedy tokens and prompt logprobs), written to bench/results/models_gpu_bf16.json.

    python bench/models_gpu.py --out bench/results/models_gpu_bf16.json    # on a CUDA machine

Random weights, so no tokenizer: prompts are random token ids. In bf16 two correct implementations round
differently, so greedy tokens may part where the top two logits nearly tie; a model passes when, for
every prompt, the tokens are equal or the first differing pair are each in the other side's top-5 at that
position (vLLM's check_logprobs_close rule), and prompt logprobs agree within 0.1 nats on average.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ~0.2-0.4 B parameters: real head sizes and GQA ratios, small enough for seconds per model.
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MODELS = {  # in run order: the first five cover the attention variants
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
              "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=128)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(head_dim=128, sliding_window=64, query_pre_attn_scalar=128)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=64)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {}),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {}),
    "cohere": ("CohereForCausalLM", "CohereConfig", dict(use_qk_norm=True, logit_scale=0.25)),
    "glm4": ("Glm4ForCausalLM", "Glm4Config", dict(head_dim=128)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(head_dim=256, num_key_value_heads=1)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True)),
}
PROMPT_LENS = (5, 17, 60, 120, 200, 333)
NEW = 32
DEV, DTYPE = "cuda", torch.bfloat16


def build(name: str, d: Path):
    import transformers

    arch, cls, extra = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**{**SHAPE, **extra})
    config.architectures = [arch]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPE, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():  # perturb norms and biases too (HF starts them at 1 / 0)
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(d)
    return model.to(DEV).eval()


@torch.no_grad()
def hf_run(model, prompt):
    ids = torch.tensor([prompt], device=DEV)
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    prompt_lp = [float(logp[i - 1, prompt[i]]) for i in range(1, len(prompt))]
    out, tops = list(prompt), []
    for _ in range(NEW):
        last = torch.log_softmax(model(torch.tensor([out], device=DEV)).logits[0, -1].float(), -1)
        tops.append(set(last.topk(5).indices.tolist()))
        out.append(int(last.argmax()))
    return out[len(prompt):], prompt_lp, tops


def compare(name: str, backend: str | None) -> dict:
    from folio import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ref = build(name, d)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, SHAPE["vocab_size"], (n,), generator=g).tolist() for n in PROMPT_LENS]
        t = time.monotonic()
        kw = {"attention_backend": backend} if backend else {}
        # max_num_seqs 8: the decode CUDA graphs of batch 1, 2, 4, 8 are captured (and replayed) as in serving.
        llm = LLM(str(d), dtype=str(DTYPE).removeprefix("torch."), device=DEV, max_model_len=1024, max_num_seqs=8,
                  **kw)
        used_backend = llm.engine.attention_backend
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=5,
                                           prompt_logprobs=0), use_tqdm=False)
        folio_s = time.monotonic() - t
        llm.shutdown()
        rows, ok = [], True
        for p, o in zip(prompts, outs):
            toks, plp, tops = hf_run(ref, p)
            got = o.outputs[0].token_ids
            mine = [float(e[p[i]].logprob) for i, e in enumerate(o.prompt_logprobs) if e is not None]
            diff = [abs(a - b) for a, b in zip(mine, plp)]
            first = next((i for i, (a, b) in enumerate(zip(got, toks)) if a != b), None)
            close = first is None or (got[first] in tops[first] and toks[first] in set(o.outputs[0].logprobs[first]))
            mean_diff = sum(diff) / len(diff) if diff else 0.0
            ok &= close and mean_diff < 0.1
            rows.append({"prompt_len": len(p), "tokens_equal": first is None, "first_difference": first,
                         "difference_within_top5": close, "prompt_logprob_mean_abs_diff": round(mean_diff, 5),
                         "prompt_logprob_max_abs_diff": round(max(diff, default=0.0), 5)})
        del ref
        if DEV == "cuda":
            torch.cuda.empty_cache()
        return {"architecture": MODELS[name][0], "backend": used_backend, "ok": ok, "folio_seconds": round(folio_s, 2),
                "prompts": rows}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--out", default="bench/results/models_gpu_bf16.json")
    ap.add_argument("--smoke", action="store_true", help="a tiny float32 run on the CPU, to check the script")
    args = ap.parse_args()
    import transformers

    global DEV, DTYPE, NEW, PROMPT_LENS
    if args.smoke:
        DEV, DTYPE, NEW, PROMPT_LENS = "cpu", torch.float32, 4, (5, 17)
        SHAPE.update(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=512, num_attention_heads=4,
                     num_key_value_heads=2)

    results = {}
    record = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "dtype": str(DTYPE).removeprefix("torch."), "shape": SHAPE, "new_tokens": NEW, "models": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        try:
            results[name] = compare(name, None)
        except NotImplementedError as e:  # an attention variant the Triton kernels lack: the torch backend
            results[name] = {**compare(name, "torch"), "note": f"triton: {e}"}
        except Exception as e:  # record and go on: one model's failure should not hide the others
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "prompts"}), flush=True)
        Path(args.out).write_text(json.dumps(record, indent=1))  # after each model: a cut-off run keeps its part
    return 0


if __name__ == "__main__":
    sys.exit(main())
