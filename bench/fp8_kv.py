"""FP8 KV cache on one GPU, Llama-3-8B shape: how many tokens the engine's pool holds (bf16 vs fp8, same memory
budget) and the paged-decode kernel's time over a bf16 pool vs an fp8 pool at several batch sizes.

    python bench/fp8_kv.py [--batches 1 16 64 256] [--ctx 2048] [--no-engine] [--json bench/results/fp8_kv_<date>.json]
    python bench/fp8_kv.py --accuracy [--device cpu]   # the bundled model's prompt logprobs, fp8 vs float32 cache
    python bench/fp8_kv.py --preemption   # adds a workload whose KV overflows a bf16 pool but fits fp8 (~40 s more)

Every fp8 decode is first checked against torch SDPA over the same (dequantized) K/V; the table also shows how
far the fp8 output is from the bf16 pool's (the quantization error itself). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kernels.paged_decode import paged_decode  # noqa: E402
from services.engine.attention.kv_quant import quantize_kv_fp8  # noqa: E402

DEV = torch.device("cuda")
HQ, HKV, D, BLOCK = 32, 8, 128, 16  # Llama-3-8B attention: 32 query heads, 8 KV heads, head_dim 128
LAYERS = 32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    assert not a.isnan().any(), "NaN in output"
    return ((a - b).norm() / b.norm()).item()


def decode_case(batch: int, ctx: int, k_scale: float, v_scale: float) -> dict:
    g = torch.Generator(device=DEV).manual_seed(batch)
    nb = triton.cdiv(ctx, BLOCK)
    pool = torch.randn(2, batch * nb, BLOCK, HKV, D, device=DEV, generator=g)  # K/V of a real model are ~N(0, 1)
    bf16 = pool.to(torch.bfloat16)
    fp8 = quantize_kv_fp8(pool, k_scale, v_scale)
    del pool
    tables = torch.randperm(batch * nb, device=DEV, generator=g).to(torch.int32).view(batch, nb)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    q = torch.randn(batch, HQ, D, device=DEV, dtype=torch.bfloat16, generator=g)
    scale = D ** -0.5

    def contiguous(cache, i, s):  # [batch, HKV, ctx, D] in bf16, dequantized
        if cache.dtype == torch.float8_e4m3fn:  # gather bytes: float8 indexing is missing on some devices
            x = cache.view(torch.uint8)[i][tables.long()].view(cache.dtype)
        else:
            x = cache[i][tables.long()]
        return (x.float() * s).to(torch.bfloat16).reshape(batch, nb * BLOCK, HKV, D)[:, :ctx].transpose(1, 2)

    run_bf16 = lambda: paged_decode(q, bf16, tables, lens, scale, max_seq_len=ctx)  # noqa: E731
    run_fp8 = lambda: paged_decode(q, fp8, tables, lens, scale, max_seq_len=ctx, k_scale=k_scale,  # noqa: E731
                                   v_scale=v_scale)
    ref_fp8 = F.scaled_dot_product_attention(q[:, :, None], contiguous(fp8, 0, k_scale), contiguous(fp8, 1, v_scale),
                                             scale=scale, enable_gqa=True)[:, :, 0]
    ref_bf16 = F.scaled_dot_product_attention(q[:, :, None], contiguous(bf16, 0, 1.0), contiguous(bf16, 1, 1.0),
                                              scale=scale, enable_gqa=True)[:, :, 0]
    out_fp8, out_bf16 = run_fp8(), run_bf16()
    row = dict(batch=batch, ctx=ctx, err_fp8_vs_sdpa=rel_err(out_fp8, ref_fp8),
               err_bf16_vs_sdpa=rel_err(out_bf16, ref_bf16), fp8_vs_bf16_pool=rel_err(out_fp8, out_bf16))
    assert row["err_fp8_vs_sdpa"] < 1e-2, f"fp8 decode batch {batch}: relative error {row['err_fp8_vs_sdpa']}"
    assert row["err_bf16_vs_sdpa"] < 1e-2, f"bf16 decode batch {batch}: relative error {row['err_bf16_vs_sdpa']}"
    for name, fn, elem in (("bf16", run_bf16, 2), ("fp8", run_fp8, 1)):
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        row[f"{name}_us"] = ms * 1e3
        row[f"{name}_TBps"] = 2 * batch * ctx * HKV * D * elem / ms / 1e9
    row["speedup"] = row["bf16_us"] / row["fp8_us"]
    del bf16, fp8
    torch.cuda.empty_cache()
    return row


def engine_tokens(kv_cache_dtype: str, model_dir: Path, max_model_len: int = 8192) -> dict:
    """The pool an engine sizes for itself (gpu_memory_utilization 0.9) with random 8B weights."""
    from services.engine.engine import EngineConfig, LLMEngine

    t = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=str(model_dir), load_format="dummy", dtype="bfloat16",
                                    max_model_len=max_model_len, enforce_eager=True, enable_prefix_caching=False,
                                    kv_cache_dtype=kv_cache_dtype))
    pool = engine.runner.kv_caches
    row = dict(kv_cache_dtype=kv_cache_dtype, pool_dtype=str(pool[0].dtype).removeprefix("torch."),
               blocks=engine.blocks.num_blocks, tokens=engine.blocks.num_blocks * engine.blocks.block_size,
               pool_GiB=sum(c.numel() * c.element_size() for c in pool) / 2**30, startup_s=time.perf_counter() - t)
    engine.shutdown()
    del engine, pool
    gc.collect()
    torch.cuda.empty_cache()
    return row


def preemption_run(kv_cache_dtype: str, model_dir: Path, pool_bytes: int, requests: int, in_len: int,
                   out_len: int) -> dict:
    """Random 8B weights, a pool of `pool_bytes` (the same bytes for either dtype), `requests` sequences of
    in_len + out_len tokens all admitted at once: output tok/s and the scheduler's preemptions."""
    from folio import LLM, SamplingParams

    blocks = pool_bytes // (2 * LAYERS * BLOCK * HKV * D * (1 if kv_cache_dtype == "fp8" else 2))
    llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=in_len + out_len + 16,
              num_kv_blocks=blocks, max_num_seqs=requests, enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype)
    g = torch.Generator().manual_seed(0)
    vocab = llm.engine.vocab_size
    prompts = [torch.randint(3, vocab, (in_len,), generator=g).tolist() for _ in range(requests)]
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    before = llm.engine.scheduler.num_preemptions
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    row = dict(kv_cache_dtype=kv_cache_dtype, pool_blocks=blocks, pool_tokens=blocks * BLOCK,
               needed_tokens=requests * (in_len + out_len), output_tok_s=n_out / secs, seconds=secs,
               preemptions=llm.engine.scheduler.num_preemptions - before)
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return row


def accuracy(device: str, tokens: int = 2048) -> dict:
    """The bundled model (real weights) in float32: |prompt logprob with an fp8 cache - with a float32 cache| over
    a fixed text, the first `tokens` tokens of Python's own language-reference topics (pydoc_data)."""
    from pydoc_data.topics import topics

    from folio import LLM, SamplingParams

    text = "\n\n".join(topics[k] for k in sorted(topics))
    logprobs, ids = {}, None
    for kv in ("auto", "fp8"):
        llm = LLM(dtype="float32", device=device, kv_cache_dtype=kv, max_model_len=tokens + 8,
                  max_num_batched_tokens=tokens + 8, gpu_memory_utilization=0.3, cpu_kv_cache_bytes=256 << 20)
        ids = llm.get_tokenizer().encode(text)[:tokens]
        out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)[0]
        logprobs[kv] = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs, ids) if d is not None])
        llm.shutdown()
    diff = (logprobs["fp8"] - logprobs["auto"]).abs()
    return dict(device=device, text="pydoc_data.topics, sorted, first tokens", tokens=len(ids),
                mean_abs_diff=diff.mean().item(), p99_abs_diff=diff.quantile(0.99).item(),
                max_abs_diff=diff.max().item(),
                mean_logprob_fp32=logprobs["auto"].mean().item(), mean_logprob_fp8=logprobs["fp8"].mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--no-engine", action="store_true", help="skip the engine pool sizing (two 8B engine starts)")
    ap.add_argument("--json", default=None, help="default bench/results/fp8_kv[_accuracy]_<date>.json")
    ap.add_argument("--accuracy", action="store_true", help="only the bundled model's prompt-logprob accuracy")
    ap.add_argument("--device", default="cuda", help="--accuracy's device (cpu works)")
    ap.add_argument("--preemption", action="store_true",
                    help="also run 128 x (256 in + 240 out) on a 4 GiB pool: 32k tokens in bf16, 64k in fp8")
    args = ap.parse_args()
    kind = "fp8_kv_accuracy" if args.accuracy else "fp8_kv"
    args.json = args.json or str(ROOT / "bench" / "results" / f"{kind}_{datetime.date.today()}.json")
    if args.accuracy:
        r = accuracy(args.device)
        print(f"bundled model, float32, {r['tokens']} prompt tokens: |logprob fp8 cache - float32 cache| mean "
              f"{r['mean_abs_diff']:.4f}, p99 {r['p99_abs_diff']:.3f}, max {r['max_abs_diff']:.3f}; mean logprob "
              f"{r['mean_logprob_fp32']:.4f} (fp32) vs {r['mean_logprob_fp8']:.4f} (fp8)")
        Path(args.json).write_text(json.dumps(r, indent=1))
        print(f"wrote {args.json}")
        return
    if not torch.cuda.is_available():
        sys.exit("bench/fp8_kv.py needs a CUDA GPU")
    t0 = time.perf_counter()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}; Llama-3-8B shape (32 layers, 32/8 heads, "
          f"d 128), block {BLOCK}")
    record = dict(gpu=gpu, date=str(datetime.date.today()), shape="llama-3-8b", decode=[], engine=[])

    print(f"\npaged decode, ctx {args.ctx}, bf16 queries; fp8 pool scales k 0.02, v 0.015 (checked against SDPA first)")
    print(f"{'batch':>6}{'bf16 us':>10}{'bf16 TB/s':>11}{'fp8 us':>10}{'fp8 TB/s':>10}{'speedup':>9}"
          f"{'err fp8':>10}{'fp8 vs bf16':>13}")
    for b in args.batches:
        r = decode_case(b, args.ctx, k_scale=0.02, v_scale=0.015)
        record["decode"].append(r)
        print(f"{b:>6}{r['bf16_us']:>10.1f}{r['bf16_TBps']:>11.2f}{r['fp8_us']:>10.1f}{r['fp8_TBps']:>10.2f}"
              f"{r['speedup']:>8.2f}x{r['err_fp8_vs_sdpa']:>10.1e}{r['fp8_vs_bf16_pool']:>13.1e}")
    print("  TB/s = bytes of KV read / kernel time (fp8 reads half the bytes). err fp8 = fp8 kernel vs SDPA on\n"
          "  the same dequantized K/V; fp8 vs bf16 = the fp8 pool's output against the bf16 pool's (quantization error).")

    spec = importlib.util.spec_from_file_location("throughput", ROOT / "bench" / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)  # its write_config: the Llama-3-8B config.json
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = throughput.write_config("llama-3-8b", Path(tmp))
        if not args.no_engine:
            t = time.perf_counter()
            record["engine"] = [engine_tokens(kv, model_dir) for kv in ("auto", "fp8")]
            print(f"\nengine pool, gpu_memory_utilization 0.9, random bf16 weights ({time.perf_counter() - t:.0f} s)")
            print(f"{'kv_cache_dtype':>15}{'pool dtype':>16}{'blocks':>9}{'tokens':>10}{'pool GiB':>10}{'startup s':>11}")
            for r in record["engine"]:
                print(f"{r['kv_cache_dtype']:>15}{r['pool_dtype']:>16}{r['blocks']:>9}{r['tokens']:>10}"
                      f"{r['pool_GiB']:>10.1f}{r['startup_s']:>11.1f}")
            record["fp8_over_bf16_tokens"] = record["engine"][1]["tokens"] / record["engine"][0]["tokens"]
            print(f"  fp8 holds {record['fp8_over_bf16_tokens']:.3f}x the tokens of bf16")
        if args.preemption:
            t = time.perf_counter()
            record["preemption"] = [preemption_run(kv, model_dir, 4 << 30, 128, 256, 240) for kv in ("auto", "fp8")]
            print(f"\nworkload 128 x (256 in + 240 out), max_num_seqs 128, the same 4 GiB pool, random 8B weights "
                  f"({time.perf_counter() - t:.0f} s)")
            print(f"{'kv_cache_dtype':>15}{'pool tokens':>13}{'needed':>9}{'out tok/s':>11}{'preemptions':>13}")
            for r in record["preemption"]:
                print(f"{r['kv_cache_dtype']:>15}{r['pool_tokens']:>13}{r['needed_tokens']:>9}"
                      f"{r['output_tok_s']:>11.0f}{r['preemptions']:>13}")
    record["total_s"] = time.perf_counter() - t0
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1))
    print(f"\nwrote {args.json} ({record['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
