"""Fused mixture-of-experts on one GPU: correctness first, then speed against the bytes of the experts read.

    python bench/moe.py                 # everything, < 90 s on one H200
    python bench/moe.py --no-e2e        # the layer only (~30 s)
    python bench/moe.py --only-e2e      # step 4 alone

In one run, in this order (each check prints PASS/FAIL; the JSON records every figure):
 1. The Triton fused-MoE kernel against its torch reference in bf16: routings that leave experts with no
    tokens, one token and all tokens; both activations (SwiGLU; gpt-oss's clamped SwiGLU with biases).
 2. CUDA-graph capture of a MoE block's decode step (router, top-k, alignment, both GEMMs): replays with new
    inputs equal eager runs (no host sync, no data-dependent shape, or capture fails).
 3. The MoE block (router + top-k + experts) at decode batch 1, 16, 64, 256 for the Mixtral-8x7B layer
    (8 experts, top-2, hidden 4096, intermediate 14336) and the Qwen3-30B-A3B layer (128 experts, top-8,
    hidden 2048, intermediate 768), random bf16 weights: time, bytes of the distinct experts the batch routes
    to (+ activations), and that as a fraction of the device copy bandwidth measured in the same run
    (read + write bytes / s, FACTS.md's ceiling). transformers' own sparse-MoE block of the same family, on
    the same weights and inputs: its output is compared with Folio's and its time is shown beside.
    A few alternative tile configs are timed too (experts only, graphed) so the default can be re-tuned from the JSON.
 4. (--e2e) Folio's LLM against transformers `generate` on a reduced-layer Mixtral-8x7B (4 layers, random
    weights, bf16): the same fixed workload (prompts x in / out tokens), output tok/s each.
Writes bench/results/moe_<date>_<gpu>.json (also after step 3, so a failure in step 4 keeps the rest).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from triton.testing import do_bench  # noqa: E402

from kernels.fused_moe import default_config, fused_moe, fused_moe_ref  # noqa: E402
from services.engine.model.layers.moe import MoESpec, SparseMoeBlock, route  # noqa: E402

DEV = torch.device("cuda")
BF16 = torch.bfloat16
SHAPES = {
    "mixtral-8x7b": dict(hidden=4096, inter=14336, experts=8, top_k=2, hf="mixtral"),
    "qwen3-30b-a3b": dict(hidden=2048, inter=768, experts=128, top_k=8, hf="qwen3_moe"),
}
BATCHES = (1, 16, 64, 256)
SWEEP = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
         dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)]
E2E_BUDGET_S = 50  # step 4 starts only if steps 1-3 took less, to keep the whole run under 90 s


def bench(fn, rep=100) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=20, rep=rep, return_mode="median")


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    if a.isnan().any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def copy_bandwidth() -> float:
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), rep=50)
    del x, y
    return 2 * n / ms / 1e9  # TB/s, read + write


def spec_of(E, k, inter, **kw) -> MoESpec:
    return MoESpec(num_experts=E, top_k=k, intermediate_size=inter, source="bench",
                   fields=("num_experts", "num_experts_per_tok", "intermediate_size"), **kw)


def weights(E, H, inter, g, bias=False):
    w13 = (torch.randn(E, 2 * inter, H, generator=g, device=DEV) / H ** 0.5).to(BF16)
    w2 = (torch.randn(E, H, inter, generator=g, device=DEV) / inter ** 0.5).to(BF16)
    b13 = (0.1 * torch.randn(E, 2 * inter, generator=g, device=DEV)).to(BF16) if bias else None
    return w13, w2, b13


# --- 1. correctness --------------------------------------------------------------------------------------
def check_kernel(record) -> bool:
    g = torch.Generator(device=DEV).manual_seed(0)
    E, H, inter, k = 8, 512, 384, 2
    w13, w2, b13 = weights(E, H, inter, g, bias=True)
    cases = []
    for T, kind in [(1, "random"), (16, "random"), (300, "random"), (64, "all_to_two"), (4, "one_token_each")]:
        x = torch.randn(T, H, generator=g, device=DEV).to(BF16)
        if kind == "random":
            ids = torch.rand(T, E, generator=g, device=DEV).topk(k, dim=1).indices
        elif kind == "all_to_two":
            ids = torch.tensor([[0, 1]], device=DEV).expand(T, 2).contiguous()
        else:
            ids = (torch.arange(T * k, device=DEV) % E).view(T, k)
        tw = torch.softmax(torch.randn(T, k, generator=g, device=DEV), dim=1)
        for act, bias, limit in (("silu", None, 7.0), ("swiglu_oai", b13, 0.5)):
            got = fused_moe(x, w13, w2, tw, ids, act, bias, limit=limit)
            want = fused_moe_ref(x, w13, w2, tw, ids, act, bias, limit=limit)
            cases.append(dict(T=T, routing=kind, activation=act, rel_err=rel_err(got, want)))
    ok = all(c["rel_err"] < 2e-2 for c in cases)
    worst = max(c["rel_err"] for c in cases)
    print(f"[1] fused-MoE kernel vs torch reference, bf16, {len(cases)} cases (no / one / all tokens per expert, "
          f"both activations): worst relative error {worst:.2e} (limit 2e-2) -> {'PASS' if ok else 'FAIL'}", flush=True)
    record["kernel_check"] = dict(ok=ok, cases=cases)
    return ok


# --- 2. CUDA graphs --------------------------------------------------------------------------------------
def check_graph(record) -> bool:
    g = torch.Generator(device=DEV).manual_seed(1)
    H, inter, E, k, T = 1024, 2048, 8, 2, 16
    torch.set_default_dtype(BF16)
    with torch.device(DEV):
        block = SparseMoeBlock(H, spec_of(E, k, inter))
    torch.set_default_dtype(torch.float32)
    for p in block.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g, device=DEV) * 0.05)
    block.experts.fused = True
    static_x = torch.randn(T, H, generator=g, device=DEV).to(BF16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            block(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = block(static_x)
    except Exception as e:  # a host sync or data-dependent shape inside the step
        print(f"[2] CUDA-graph capture of the MoE block FAILED: {type(e).__name__}: {e}", flush=True)
        record["graph_check"] = dict(ok=False, error=repr(e))
        return False
    errs = []
    with torch.no_grad():
        for _ in range(3):
            static_x.copy_(torch.randn(T, H, generator=g, device=DEV).to(BF16))
            graph.replay()
            eager = block(static_x)
            errs.append(rel_err(static_out, eager))
    ok = max(errs) < 1e-3
    print(f"[2] CUDA-graph capture + 3 replays of the MoE block (batch {T}) vs eager: max rel err {max(errs):.1e} "
          f"-> {'PASS' if ok else 'FAIL'}", flush=True)
    record["graph_check"] = dict(ok=ok, rel_errs=errs)
    return ok


# --- 3. layer timing -------------------------------------------------------------------------------------
def graph_ms(fn, x) -> float:
    """Median ms of fn(x) replayed from a CUDA graph (captured on a copy of x)."""
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(static_x)
        fn(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(static_x)
    ms = bench(g.replay, rep=50)
    del g
    return ms


def hf_block(family: str, H, inter, E, k, block: SparseMoeBlock):
    """transformers' own sparse-MoE block of the family, holding the same weights."""
    import transformers

    if family == "mixtral":
        cfg = transformers.MixtralConfig(hidden_size=H, intermediate_size=inter, num_local_experts=E,
                                         num_experts_per_tok=k)
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as cls
    else:
        cfg = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=inter, num_experts=E,
                                          num_experts_per_tok=k, norm_topk_prob=True)
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as cls
    torch.set_default_dtype(BF16)
    with torch.device(DEV):
        m = cls(cfg).eval()
    torch.set_default_dtype(torch.float32)
    m.gate.weight.data.copy_(block.gate.weight)
    m.experts.gate_up_proj.data.copy_(block.experts.w13_weight)  # [E, 2I, H], gate rows then up rows
    m.experts.down_proj.data.copy_(block.experts.w2_weight)  # [E, H, I]
    return m, getattr(cfg, "_experts_implementation", None)


def time_layers(record, copy_tbs: float) -> None:
    rows = []
    print(f"[3] MoE block (router + top-k + experts), bf16, copy bandwidth {copy_tbs:.2f} TB/s", flush=True)
    hdr = (f"{'shape':<15}{'batch':>6}{'experts hit':>12}{'MB read':>9}{'eager ms':>9}{'Folio ms':>10}{'TB/s':>7}"
           f"{'roofline':>9}"
           f"{'hf ms':>9}{'hf/Folio':>9}{'hf rel err':>11}{'best cfg ms':>12}")
    print(hdr, flush=True)
    for name, s in SHAPES.items():
        H, inter, E, k = s["hidden"], s["inter"], s["experts"], s["top_k"]
        g = torch.Generator(device=DEV).manual_seed(2)
        torch.set_default_dtype(BF16)
        with torch.device(DEV):
            block = SparseMoeBlock(H, spec_of(E, k, inter))
        torch.set_default_dtype(torch.float32)
        w13, w2, _ = weights(E, H, inter, g)
        block.experts.w13_weight.data.copy_(w13)
        block.experts.w2_weight.data.copy_(w2)
        block.gate.weight.data.copy_(torch.randn(E, H, generator=g, device=DEV).to(BF16) / H ** 0.5)
        block.experts.fused = True
        del w13, w2
        try:
            hf, impl = hf_block(s["hf"], H, inter, E, k, block)
        except Exception as e:
            hf, impl = None, f"unavailable: {type(e).__name__}: {e}"
        for T in BATCHES:
            x = torch.randn(T, H, generator=g, device=DEV).to(BF16)
            with torch.no_grad():
                tw, ids = route(block.gate(x), block.spec)
                hit = int(ids.unique().numel())
                nbytes = hit * 3 * H * inter * 2 + 2 * T * H * 2
                eager_ms = bench(lambda: block(x))
                ms = graph_ms(block, x)  # as the engine runs decode steps: no launch overhead
                ref = fused_moe_ref(x, block.experts.w13_weight, block.experts.w2_weight, tw, ids)
                err_ref = rel_err(block(x), ref)
                row = dict(shape=name, batch=T, experts_hit=hit, bytes=nbytes, ms=ms, eager_ms=eager_ms,
                           TBps=nbytes / ms / 1e9,
                           roofline_fraction=nbytes / ms / 1e9 / copy_tbs, rel_err_vs_torch_ref=err_ref,
                           default_config=default_config(T * k, E))
                if hf is not None:
                    out_hf = hf(x[None])
                    out_hf = out_hf[0] if isinstance(out_hf, tuple) else out_hf
                    row["hf_rel_err"] = rel_err(block(x), out_hf.reshape(T, H))
                    row["hf_ms"] = bench(lambda: hf(x[None]), rep=50)
                w13, w2 = block.experts.w13_weight, block.experts.w2_weight
                sweep = {}
                for c in SWEEP:
                    try:
                        sweep[json.dumps(c)] = graph_ms(lambda xx, c=c: fused_moe(xx, w13, w2, tw, ids, config=c), x)
                    except Exception as e:  # e.g. out of shared memory for this tile
                        sweep[json.dumps(c)] = repr(e)[:80]
                row["experts_only_ms_default"] = graph_ms(lambda xx: fused_moe(xx, w13, w2, tw, ids), x)
                row["experts_only_ms_by_config"] = sweep
            rows.append(row)
            timed = [v for v in sweep.values() if isinstance(v, float)]
            hf_ms = row.get("hf_ms")
            print(f"{name:<15}{T:>6}{hit:>12}{nbytes / 1e6:>9.0f}{eager_ms:>9.3f}{ms:>10.3f}{row['TBps']:>7.2f}"
                  f"{row['roofline_fraction']:>9.0%}{hf_ms if hf_ms else float('nan'):>9.3f}"
                  f"{(hf_ms / ms) if hf_ms else float('nan'):>9.1f}{row.get('hf_rel_err', float('nan')):>11.1e}"
                  f"{min(timed) if timed else float('nan'):>12.3f}", flush=True)
            if err_ref > 2e-2 or row.get("hf_rel_err", 0) > 2e-2:
                print(f"    FAIL: output differs (vs torch ref {err_ref:.1e}, vs transformers "
                      f"{row.get('hf_rel_err', float('nan')):.1e})", flush=True)
        del block, hf
        gc.collect()
        torch.cuda.empty_cache()
        record.setdefault("hf_experts_implementation", {})[name] = impl
    record["layers"] = rows
    print("    Folio ms: the block replayed from a CUDA graph, as the engine's decode steps run (eager: launched "
          "op by op); roofline = (bytes of the distinct experts hit + activations) / Folio ms / copy bandwidth; "
          "hf = transformers' own block of the family on the same weights (its default experts implementation)",
          flush=True)


# --- 4. end to end ---------------------------------------------------------------------------------------
E2E_CONFIG = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1e6, hidden_act="silu",
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16")


def e2e(record, n_req: int, n_in: int, n_out: int, hf_batch: int) -> None:
    from folio import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, E2E_CONFIG["vocab_size"], (n_in,), generator=g).tolist() for _ in range(n_req)]
    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps(E2E_CONFIG))
    t0 = time.perf_counter()
    llm = LLM(str(d), load_format="dummy", dtype="bfloat16", max_model_len=n_in + n_out + 16,
              max_num_seqs=min(256, n_req), enable_prefix_caching=False, gpu_memory_utilization=0.6)
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], SamplingParams(max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    torch.cuda.synchronize()
    folio_s = time.perf_counter() - t
    n_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.shutdown()
    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()
    folio_tps = n_tok / folio_s
    print(f"[4] reduced Mixtral-8x7B (4 layers), {n_req} prompts x {n_in} in / {n_out} out: Folio {folio_tps:,.0f} "
          f"output tok/s ({folio_s:.1f} s; startup {startup:.0f} s)", flush=True)
    rec = dict(requests=n_req, input_len=n_in, output_len=n_out, folio_tok_s=folio_tps, folio_s=folio_s,
               folio_startup_s=startup, model=E2E_CONFIG)
    record["e2e"] = rec

    import transformers

    cfg = transformers.MixtralConfig(**{k: v for k, v in E2E_CONFIG.items() if k not in ("architectures", "model_type",
                                                                                        "torch_dtype")})
    torch.set_default_dtype(BF16)
    with torch.device(DEV):
        model = transformers.MixtralForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    hf_s, hf_tok = 0.0, 0
    for i in range(0, n_req, hf_batch):
        ids = torch.tensor(prompts[i:i + hf_batch], device=DEV)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out,
                           min_new_tokens=n_out, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        hf_s += time.perf_counter() - t
        hf_tok += ids.shape[0] * n_out
    rec.update(hf_tok_s=hf_tok / hf_s, hf_s=hf_s, hf_batch=hf_batch, speedup=folio_tps / (hf_tok / hf_s))
    print(f"    transformers generate (static batches of {hf_batch}): {hf_tok / hf_s:,.0f} output tok/s "
          f"({hf_s:.1f} s) -> Folio / transformers = {rec['speedup']:.1f}x (target >= 5x)", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--only-e2e", action="store_true")
    ap.add_argument("--e2e-requests", type=int, default=128)
    ap.add_argument("--e2e-in", type=int, default=128)
    ap.add_argument("--e2e-out", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/moe.py needs a CUDA GPU")
    t0 = time.perf_counter()
    gpu = torch.cuda.get_device_name()
    import transformers
    import triton

    record = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), gpu=gpu,
                  torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__)
    out = Path(args.json or Path(__file__).parent / "results" /
               f"moe_{datetime.date.today()}_{gpu.split()[-1].lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        record["wall_s"] = time.perf_counter() - t0
        out.write_text(json.dumps(record, indent=1))

    ok = True
    if not args.only_e2e:
        ok = check_kernel(record)
        ok &= check_graph(record)
        copy_tbs = copy_bandwidth()
        record["copy_TBps"] = copy_tbs
        time_layers(record, copy_tbs)
        save()
    elapsed = time.perf_counter() - t0
    if not args.no_e2e and not args.only_e2e and elapsed > E2E_BUDGET_S:
        print(f"[4] skipped: steps 1-3 took {elapsed:.0f} s; run it alone with --only-e2e", flush=True)
        record["e2e_skipped"] = f"steps 1-3 took {elapsed:.0f} s"
    elif not args.no_e2e:
        try:
            e2e(record, args.e2e_requests, args.e2e_in, args.e2e_out, args.hf_batch)
        except Exception as e:
            print(f"[4] end-to-end FAILED: {type(e).__name__}: {e}", flush=True)
            record["e2e_error"] = repr(e)
    save()
    print(f"checks {'PASS' if ok else 'FAIL'}; wrote {out} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
