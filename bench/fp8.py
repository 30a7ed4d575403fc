"""FP8 weights on one GPU, Llama-3-8B shapes: where FP8 wins and loses against bf16, per GEMM and in the engine.
One run, under ~95 s on an H200.

    python bench/fp8.py [--json PATH] [--sections checks gemm engine] [--budget 90] [--chat-requests 400]

1. checks (exit 1 on a failure): the activation quantizer bit for bit against torch (differing values, max
   e4m3 ulps, differing scales reported apart); the fused add + RMSNorm + FP8 and SwiGLU + FP8 kernels bit
   for bit against the unfused kernels followed by the quantizer; every FP8 x FP8 Triton GEMM config timed
   below against the float32 product of the same quantized operands (a config that fails is not timed);
   a CUDA-graph replay of the split-K GEMM.
2. gemm: per M (1, 16, 64, 256, 512, 2048, 8192) and 8B GEMM (qkv, o, gate_up, down), ms per call (one CUDA
   graph over enough weight copies to overflow L2): bf16 F.linear; the engine's FP8 path as committed (its
   own quantization included); the quantizer alone; torch._scaled_mm row-wise (per-token x per-channel) and
   tensor-wise (unit scales: the GEMM of a layer whose scales its consumer applies) on pre-quantized
   activations; the Triton FP8 x FP8 configs; the weight-only kernel (M <= 64). Also add + RMSNorm and
   SwiGLU: plain, followed by the quantizer, fused, and fused on an unscaled GEMM output (SwiGLU + FP8 in
   several launches, checked bit for bit, the fastest applied); the bf16 LM head. Prints per-layer sums
   (bf16; FP8 as committed; with fused quantization and the best GEMMs; with deferred scales) and applies
   the Triton GEMM's winners (kernels/fp8_w8a8.py TUNED) for the engine section.
3. engine: the fixed workload (256 x 256 random tokens in, 256 out; a warm-up pass over the first 64 prompts
   first, so no kernel compiles inside the timed run), output tok/s and per-step host/wait split: bf16;
   FP8 (fused quantization, deferred scales, the winners); FP8 + FP8 KV cache; FP8 without deferred scales;
   the chat workload (bench/throughput.py's, first N requests) for bf16 and FP8 on the same engines.
Sections that would pass the time budget are skipped, and say so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

import quant as qb  # noqa: E402  (bench/quant.py: timing, checks and engine helpers)

from kernels import fp8_w8a8 as w8a8  # noqa: E402
from kernels import splitk  # noqa: E402
from kernels.fp8_gemv import fp8_w8a16  # noqa: E402
from kernels.fp8_quant import quantize_fp8_rows  # noqa: E402
from kernels.fused_norm import add_rms_norm, add_rms_norm_fp8  # noqa: E402
from kernels.silu_mul import silu_mul, silu_mul_fp8  # noqa: E402
from services.engine.model.quantization import fp8 as fp8mod  # noqa: E402

DEV, DTYPE, SHAPES = qb.DEV, qb.DTYPE, qb.SHAPES
HIDDEN, INTER, VOCAB = qb.HIDDEN, qb.INTER, 128256
MS = (1, 16, 64, 256, 512, 2048, 8192)


def w8a8_candidates(m: int) -> list[dict]:
    """Triton FP8 x FP8 configs per M (SPLIT_K None: the wrapper's choice, about two programs per SM)."""
    if m < 64:
        return []
    if m == 64:
        tiles = [(64, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 128, 256, 4, 3)]
    elif m <= 512:
        tiles = [(64, 128, 128, 4, 4), (128, 128, 128, 8, 4), (128, 64, 128, 4, 4), (128, 256, 128, 8, 3)]
    else:
        tiles = [(128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (128, 256, 64, 8, 4)]
    out = []
    for bm, bn, bk, warps, stages in tiles:
        base = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        out.append(dict(base))
        if m <= w8a8.SPLIT_MAX_M:
            out.append(dict(base, SPLIT_K=1))
            out.append(dict(base, SPLIT_K="x2"))  # twice the wrapper's choice, resolved per shape below
    return out


def resolve(cfg: dict, m: int, n: int, k: int) -> dict:
    """A candidate with its SPLIT_K made concrete for this shape."""
    cfg = dict(cfg)
    if m > w8a8.SPLIT_MAX_M:  # the wrapper does not split K there
        cfg["SPLIT_K"] = 1
    elif cfg.get("SPLIT_K") == "x2":
        tiles = -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
        blocks = -(-k // cfg["BLOCK_K"])
        cfg["SPLIT_K"] = min(16, 2 * splitk.split_for(tiles, blocks, splitk.sm_count(DEV), 2, min_blocks=4))
    elif "SPLIT_K" not in cfg:
        tiles = -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
        blocks = -(-k // cfg["BLOCK_K"])
        cfg["SPLIT_K"] = splitk.split_for(tiles, blocks, splitk.sm_count(DEV), 2, min_blocks=4)
    return cfg


def rand_x(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(m, k, generator=g, device=DEV) * (1 + 10 * torch.rand(m, 1, generator=g, device=DEV))).to(DTYPE)


# --- checks ----------------------------------------------------------------------------------------------
def checks(failures: list) -> list[dict]:
    rows: list[dict] = []
    g = torch.Generator(device=DEV).manual_seed(0)
    for k in (HIDDEN, INTER):
        for m in MS:
            x = rand_x(m, k, g)
            for static, ub in ((None, None), (None, 2.0), (torch.tensor([0.05], device=DEV), None)):
                got = qb.attempt(lambda: quantize_fp8_rows(x, static, ub))
                diff = qb.fp8_quant_diff(got, fp8mod.quantize_activation(x, static, ub), x if static is None else None)
                qb.record(rows, failures, diff.get("q_diff") == 0 and diff.get("s_diff") == 0, check="fp8_quant_bits",
                          K=k, M=m, static=static is not None, ub=ub, **diff)
    w = (1 + 0.1 * torch.randn(HIDDEN, generator=g, device=DEV)).to(DTYPE)
    for m in (1, 16, 256, 2048):
        x, res = rand_x(m, HIDDEN, g), rand_x(m, HIDDEN, g)
        r1, r2 = res.clone(), res.clone()
        got = qb.attempt(lambda: add_rms_norm_fp8(x, r1, w, 1e-5))
        want = quantize_fp8_rows(add_rms_norm(x, r2, w, 1e-5))
        diff = qb.fp8_quant_diff(got, want)
        qb.record(rows, failures, diff.get("q_diff") == 0 and diff.get("s_diff") == 0 and torch.equal(r1, r2),
                  check="rms_norm_fp8_bits", M=m, **diff)
        gu = rand_x(m, 2 * INTER, g)
        diff = qb.fp8_quant_diff(qb.attempt(lambda: silu_mul_fp8(gu)), quantize_fp8_rows(silu_mul(gu)))
        qb.record(rows, failures, diff.get("q_diff") == 0 and diff.get("s_diff") == 0, check="silu_mul_fp8_bits",
                  M=m, **diff)
    return rows


def check_w8a8(failures: list, rows: list, name: str, m: int, xq, xs, layer, ref, cfg) -> bool:
    out = qb.attempt(lambda: w8a8.fp8_w8a8(xq, xs, layer.weight, layer.weight_scale, DTYPE, config=cfg))
    err = qb.err_of(out, ref)
    ok = err < 1e-2 and qb.workspace_clean()
    qb.record(rows, failures, ok, check="w8a8", shape=name, M=m, config=cfg, rel_err=err)
    return ok


def graph_check(failures: list, rows: list) -> None:
    g = torch.Generator(device=DEV).manual_seed(3)
    k, n = SHAPES["down"]
    layer, _ = qb.fp8_layer((torch.randn(n, k, generator=g, device=DEV) * 0.02).to(DTYPE))
    w8a8.reserve_workspace(DEV, n)
    x = rand_x(256, k, g)
    cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4, SPLIT_K=4)
    err, ok = qb.replay_matches(
        lambda v: w8a8.fp8_w8a8(*quantize_fp8_rows(v), layer.weight, layer.weight_scale, DTYPE, config=cfg), x, g)
    qb.record(rows, failures, ok, check="w8a8_cuda_graph", shape="down", M=256, config=cfg, rel_err=err)


# --- GEMM and elementwise timings ------------------------------------------------------------------------
def gemm(failures: list, check_rows: list, start: float, budget: float) -> dict:
    g = torch.Generator(device=DEV).manual_seed(1)
    rows, weights = [], {}
    for name, (k, n) in SHAPES.items():
        bf = [(torch.randn(n, k, generator=g, device=DEV) * 0.02).to(DTYPE) for _ in range(qb.copies_for(2 * n * k))]
        f8 = [qb.fp8_layer(bf[i % len(bf)])[0] for i in range(qb.copies_for(n * k))]
        w8a8.reserve_workspace(DEV, n)
        weights[name] = (bf, f8)
    order = sorted(MS, key=lambda m: (256, 1, 8192, 2048, 64, 16, 512).index(m))  # the fixed workload's first
    plan = [(m, name) for m in order for name in SHAPES]
    jobs = []
    xs = {}
    for m, name in plan:
        k, n = SHAPES[name]
        xq, xsc = quantize_fp8_rows(rand_x(m, k, g))
        xs[(m, name)] = (xq, xsc)
        la = weights[name][1][0]
        jobs += [lambda a=xq, s=xsc, la=la, c=resolve(c, m, n, k): w8a8.fp8_w8a8(a, s, la.weight, la.weight_scale, DTYPE,
                                                                                  config=c, warmup=True)
                 for c in w8a8_candidates(m)]
    qb.precompile(jobs)
    for m, name in plan:
        k, n = SHAPES[name]
        if time.time() - start > budget:
            print(f"gemm {name} M={m}: skipped (time budget)", flush=True)
            continue
        bf, f8 = weights[name]
        xq, xsc = xs[(m, name)]
        x = (xq.float() * xsc).to(DTYPE)  # a 16-bit input whose quantization is xq, xsc
        t = {"bf16": qb.graph_ms([lambda w=w: F.linear(x, w) for w in bf])}
        t["fp8_engine"] = qb.graph_ms([lambda la=la: fp8mod.FP8Method("b").apply(la, x, None) for la in f8])
        t["quant"] = qb.graph_ms([lambda: quantize_fp8_rows(x)] * 4)
        t["scaled_mm_rowwise"] = qb.graph_ms([lambda la=la: torch._scaled_mm(
            xq, la.weight.t(), scale_a=xsc, scale_b=la.weight_scale, out_dtype=DTYPE) for la in f8])
        one = torch.ones((), device=DEV)
        t["scaled_mm_tensorwise"] = qb.graph_ms([lambda la=la: torch._scaled_mm(
            xq, la.weight.t(), scale_a=one, scale_b=one, out_dtype=DTYPE) for la in f8])
        if m <= 64:
            t["w8a16"] = qb.graph_ms([lambda la=la: fp8_w8a16(x, la.weight, la.weight_scale) for la in f8])
        cands = []
        if w8a8_candidates(m):
            ref = (xq.float() * xsc) @ (f8[0].weight.float() * f8[0].weight_scale.reshape(-1, 1)).t()
            for c in w8a8_candidates(m):
                cfg = resolve(c, m, n, k)
                if not check_w8a8(failures, check_rows, name, m, xq, xsc, f8[0], ref, cfg):
                    continue
                ms = qb.graph_ms([lambda la=la: w8a8.fp8_w8a8(xq, xsc, la.weight, la.weight_scale, DTYPE, config=cfg)
                                  for la in f8])
                cands.append({"config": cfg, "ms": ms})
            del ref
        best = min(cands, key=lambda c: c["ms"]) if cands else None
        row = {"shape": name, "M": m, "N": n, "K": k, "ms": t, "w8a8": cands, "w8a8_best": best}
        rows.append(row)
        print(f"{name:<8}M={m:<5}" + " ".join(f"{key} {v:.4f}" for key, v in t.items())
              + (f" w8a8 {best['ms']:.4f} {best['config']}" if best else ""), flush=True)
    del weights
    torch.cuda.empty_cache()
    return {"rows": rows, "elementwise": elementwise(g, failures, check_rows), "lm_head": lm_head(g)}


SILU_FP8_CONFIGS = [{}, {"num_warps": 8}, {"BLOCK": 4096, "num_warps": 8}, {"BLOCK": 2048, "num_warps": 4},
                    {"BLOCK": 1024, "num_warps": 4}]
"""silu_mul_fp8 launches ({}: the whole row in one block, 16 warps); each checked bit for bit before timing."""


def elementwise(g: torch.Generator, failures: list, check_rows: list) -> list[dict]:
    """add + RMSNorm (hidden 4096) and SwiGLU (14336) per M: plain, then the quantizer, fused, and fused on an
    FP8 GEMM's unscaled output (deferred scales); SwiGLU + FP8 in each SILU_FP8_CONFIGS launch."""
    out = []
    w = (1 + 0.1 * torch.randn(HIDDEN, generator=g, device=DEV)).to(DTYPE)
    gu, row, col = rand_x(16, 2 * INTER, g), torch.ones(16, 1, device=DEV), torch.ones(1, 2 * INTER, device=DEV)
    qb.precompile([lambda c=c, sc=sc: silu_mul_fp8(gu, block=c.get("BLOCK"), scales=sc, num_warps=c.get("num_warps"),
                                                   warmup=True)
                   for c in SILU_FP8_CONFIGS for sc in (None, (row, col))])
    for m in MS:
        x, res, gu = rand_x(m, HIDDEN, g), rand_x(m, HIDDEN, g), rand_x(m, 2 * INTER, g)
        row = torch.rand(m, 1, generator=g, device=DEV) * 0.01
        col_h, col_i = (torch.rand(1, n, generator=g, device=DEV) * 0.01 for n in (HIDDEN, 2 * INTER))
        t = {"norm": qb.graph_ms([lambda: add_rms_norm(x, res, w, 1e-5)] * 4),
             "norm+quant": qb.graph_ms([lambda: quantize_fp8_rows(add_rms_norm(x, res, w, 1e-5))] * 4),
             "norm_fp8": qb.graph_ms([lambda: add_rms_norm_fp8(x, res, w, 1e-5)] * 4),
             "norm_fp8_scaled": qb.graph_ms([lambda: add_rms_norm_fp8(x, res, w, 1e-5, x_scales=(row, col_h))] * 4),
             "silu": qb.graph_ms([lambda: silu_mul(gu)] * 4),
             "silu+quant": qb.graph_ms([lambda: quantize_fp8_rows(silu_mul(gu))] * 4)}
        want = quantize_fp8_rows(silu_mul(gu, scales=(row, col_i)))
        for i, c in enumerate(SILU_FP8_CONFIGS):
            diff = qb.fp8_quant_diff(qb.attempt(lambda: silu_mul_fp8(gu, block=c.get("BLOCK"), scales=(row, col_i),
                                                                    num_warps=c.get("num_warps"))), want)
            ok = diff.get("q_diff") == 0 and diff.get("s_diff") == 0
            qb.record(check_rows, failures, ok, check="silu_mul_fp8_scaled_bits", M=m, config=c, **diff)
            if ok:
                t[f"silu_fp8_scaled/{i}"] = qb.graph_ms([lambda: silu_mul_fp8(
                    gu, block=c.get("BLOCK"), scales=(row, col_i), num_warps=c.get("num_warps"))] * 4)
        t["silu_fp8"] = qb.graph_ms([lambda: silu_mul_fp8(gu)] * 4)
        out.append({"M": m, "ms": t})
        print(f"elementwise M={m:<5}" + " ".join(f"{k} {v:.4f}" for k, v in t.items()), flush=True)
    return out


def pick_silu_fp8(elem: dict) -> dict:
    """The SwiGLU + FP8 launch with the least time over the fixed workload's steps (256 decode steps at 256
    rows, 8 prefill steps at 8192), applied to kernels/silu_mul.py FP8_CONFIG for the engine section."""
    from kernels import silu_mul as sm

    def cost(i):
        return sum(n * elem[m].get(f"silu_fp8_scaled/{i}", float("inf")) for m, n in ((256, 256), (8192, 8)) if m in elem)

    best = min(range(len(SILU_FP8_CONFIGS)), key=cost)
    sm.FP8_CONFIG.clear()
    sm.FP8_CONFIG.update(SILU_FP8_CONFIGS[best])
    print(f"\nkernels/silu_mul.py FP8_CONFIG (applied for the engine section): {SILU_FP8_CONFIGS[best]!r}")
    for m, e in elem.items():
        e["silu_fp8_scaled"] = e.get(f"silu_fp8_scaled/{best}", float("nan"))
    return SILU_FP8_CONFIGS[best]


def lm_head(g: torch.Generator) -> dict:
    w = (torch.randn(VOCAB, HIDDEN, generator=g, device=DEV) * 0.02).to(DTYPE)
    out = {}
    for m in (1, 256, 2048):
        x = rand_x(m, HIDDEN, g)
        out[m] = qb.graph_ms([lambda: F.linear(x, w)] * 2)
    print("bf16 LM head ms: " + ", ".join(f"M={m} {v:.4f}" for m, v in out.items()), flush=True)
    del w
    return out


def summarize(result: dict) -> dict:
    """Per-layer sums per M, and the Triton GEMM's winners applied to kernels/fp8_w8a8.py TUNED."""
    rows, elem = result["rows"], {e["M"]: e["ms"] for e in result["elementwise"]}
    print("\nPer GEMM, ms (x = bf16 / that; quant = the activation quantizer alone):")
    print(f"{'M':>5} {'shape':<8}{'bf16':>8}{'fp8 eng':>8}{'quant':>7}{'rowwise':>8}{'tensorw':>8}{'w8a16':>8}"
          f"{'w8a8':>8}{'best':>8}{'x best':>7}  best path (quant excluded)")
    layer, tuned = {}, {}
    for r in rows:
        t = r["ms"]
        paths = {"scaled_mm": t["scaled_mm_rowwise"]}
        if r["w8a8_best"]:
            paths["w8a8"] = r["w8a8_best"]["ms"]
        best_name = min(paths, key=paths.get)
        best = paths[best_name]
        if best_name == "w8a8" and best < 0.97 * t["scaled_mm_rowwise"]:
            tuned[(w8a8.m_bucket(r["M"]), r["N"], r["K"])] = {k: v for k, v in r["w8a8_best"]["config"].items()}
        else:
            best_name, best = "scaled_mm", t["scaled_mm_rowwise"]
        r["best_path"], r["best_ms"] = best_name, best
        print(f"{r['M']:>5} {r['shape']:<8}{t['bf16']:>8.4f}{t['fp8_engine']:>8.4f}{t['quant']:>7.4f}"
              f"{t['scaled_mm_rowwise']:>8.4f}{t['scaled_mm_tensorwise']:>8.4f}{t.get('w8a16', float('nan')):>8.4f}"
              f"{r['w8a8_best']['ms'] if r['w8a8_best'] else float('nan'):>8.4f}{best:>8.4f}{t['bf16'] / best:>7.2f}  "
              f"{best_name}")
    result["silu_fp8_config"] = pick_silu_fp8(elem)
    print("\nOne decoder layer's GEMMs + 2 norms + SwiGLU, ms: bf16; FP8 as committed (engine path, its own"
          " quantization); FP8 fused (fused norm/SwiGLU quantization, the o projection's quantizer, best GEMM);"
          " FP8 deferred (o, gate_up, down: tensor-wise GEMM, scales applied by the next norm / SwiGLU)")
    print(f"{'M':>5}{'bf16':>9}{'fp8 old':>9}{'fused':>9}{'deferred':>9}{'x old':>7}{'x fused':>8}{'x defer':>8}")
    for m in MS:
        rs = {r["shape"]: r for r in rows if r["M"] == m}
        if len(rs) != len(SHAPES) or m not in elem:
            continue
        e = elem[m]
        bf = sum(r["ms"]["bf16"] for r in rs.values()) + 2 * e["norm"] + e["silu"]
        old = sum(r["ms"]["fp8_engine"] for r in rs.values()) + 2 * e["norm"] + e["silu"]
        gem = {s: (r["ms"]["w8a16"] if "w8a16" in r["ms"] and fp8mod.weight_only(m, r["N"], r["K"]) else None)
               for s, r in rs.items()}
        if any(v is not None for v in gem.values()):  # decode sizes: the weight-only kernel, no quantization
            new = sum(v if v is not None else rs[s]["best_ms"] + rs[s]["ms"]["quant"] for s, v in gem.items()) \
                + 2 * e["norm"] + e["silu"]
            deferred = new
        else:
            new = sum(r["best_ms"] for r in rs.values()) + rs["o"]["ms"]["quant"] + 2 * e["norm_fp8"] + e["silu_fp8"]
            deferred = rs["qkv"]["best_ms"] + sum(rs[s_]["ms"]["scaled_mm_tensorwise"] for s_ in ("o", "gate_up", "down")) \
                + rs["o"]["ms"]["quant"] + 2 * e["norm_fp8_scaled"] + e["silu_fp8_scaled"]
        layer[m] = {"bf16": bf, "fp8_old": old, "fp8_fused": new, "fp8_deferred": deferred}
        print(f"{m:>5}{bf:>9.4f}{old:>9.4f}{new:>9.4f}{deferred:>9.4f}{bf / old:>7.2f}{bf / new:>8.2f}"
              f"{bf / deferred:>8.2f}")
    w8a8.TUNED.clear()
    w8a8.TUNED.update(tuned)
    print("\nkernels/fp8_w8a8.py TUNED (applied for the engine section; paste to commit):")
    for key, v in sorted(tuned.items()):
        print(f"    {key}: {v!r},")
    result["layer_ms"] = layer
    return {str(k): v for k, v in tuned.items()}


# --- engine ----------------------------------------------------------------------------------------------
def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize(DEV)


def run_engine(label: str, weights: str, kv: str, fuse: bool, defer: bool, tuned: dict, workloads: list,
               start: float, budget: float) -> list[dict]:
    """One engine; the fixed workload (warm-up pass first), then each further (name, work) in `workloads`."""
    from folio import SamplingParams

    rows = []
    saved = (fp8mod.FUSE_INPUT_QUANT, dict(w8a8.TUNED), fp8mod.DEFER_SCALES)
    fp8mod.FUSE_INPUT_QUANT, fp8mod.DEFER_SCALES = fuse, defer
    w8a8.TUNED.clear()
    w8a8.TUNED.update(tuned)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            max_len = max(len(p) + o for _, work in workloads for p, o in work) + 16
            llm = qb.make_llm(tmp, weights, max_model_len=max_len, max_num_seqs=256, gpu_memory_utilization=0.9,
                              kv_cache_dtype=kv)
            startup = time.time() - t0
            engine = llm.engine
            for wname, work in workloads:
                if rows and time.time() - start > budget:
                    print(f"engine {label} {wname}: skipped (time budget)", flush=True)
                    continue
                prompts = [{"prompt_token_ids": p} for p, _ in work]
                # warm-up: the first 64 prompts (the same prefill step shapes), 2 tokens each
                llm.generate(prompts[:64], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
                params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]
                engine.step_timing = {}
                pre = engine.scheduler.num_preemptions
                sync()
                t = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                sync()
                secs = time.perf_counter() - t
                n_out = sum(len(o.outputs[0].token_ids) for o in outs)
                timing = dict(engine.step_timing)
                engine.step_timing = None
                steps = timing.pop("steps", 0) or 1
                per_step = {k: round(1e3 * v / steps, 3) for k, v in timing.items()}
                rows.append({"engine": label, "workload": wname, "requests": len(work), "output_tok_s": n_out / secs,
                             "seconds": secs, "steps": steps, "ms_per_step": 1e3 * secs / steps,
                             "step_ms": per_step, "startup_s": startup, "kv_blocks": engine.blocks.num_blocks,
                             "preemptions": engine.scheduler.num_preemptions - pre})
                print(f"engine {label:<24} {wname:<6} {n_out / secs:>7.0f} output tok/s ({secs:.2f} s, {steps} steps, "
                      f"{1e3 * secs / steps:.2f} ms/step: " + ", ".join(f"{k} {v:.2f}" for k, v in per_step.items())
                      + f"; startup {startup:.0f} s, {engine.blocks.num_blocks} KV blocks)", flush=True)
                del outs
            llm.shutdown()
            del llm, engine
            qb.free_gpu()
    finally:
        fp8mod.FUSE_INPUT_QUANT, fp8mod.DEFER_SCALES = saved[0], saved[2]
        w8a8.TUNED.clear()
        w8a8.TUNED.update(saved[1])
    return rows


def engines(start: float, budget: float, chat_requests: int, prompts: int = 256, length: int = 256) -> list[dict]:
    import numpy as np

    import throughput as tb  # bench/throughput.py's chat workload

    rng = np.random.default_rng(0)
    fixed = [(rng.integers(3, VOCAB, length).tolist(), length) for _ in range(prompts)]
    chat = [("chat", tb.make_workload("chat", VOCAB, chat_requests))] if chat_requests else []
    new = dict(w8a8.TUNED)
    plan = [("bf16", "bf16", "auto", True, True, {}, [("fixed", fixed)] + chat),
            ("fp8", "fp8", "auto", True, True, new, [("fixed", fixed)] + chat),
            ("fp8 + fp8 KV", "fp8", "fp8", True, True, new, [("fixed", fixed)]),
            ("fp8 scales not deferred", "fp8", "auto", True, False, new, [("fixed", fixed)])]
    rows = []
    for label, weights, kv, fuse, defer, tuned, workloads in plan:
        if time.time() - start > budget:
            print(f"engine {label}: skipped (time budget)", flush=True)
            continue
        got = qb.attempt(lambda: run_engine(label, weights, kv, fuse, defer, tuned, workloads, start, budget))
        if isinstance(got, Exception):
            rows.append({"engine": label, "error": repr(got)[:300]})
            qb.free_gpu()
        else:
            rows += got
    print("\nOutput tok/s (Llama-3-8B shape, random weights):")
    for wname in ("fixed", "chat"):
        base = next((r for r in rows if r.get("workload") == wname and r["engine"] == "bf16"), None)
        for r in rows:
            if r.get("workload") == wname:
                r["vs_bf16"] = r["output_tok_s"] / base["output_tok_s"] if base else None
                print(f"  {wname:<6} {r['engine']:<24}{r['output_tok_s']:>9.0f}  "
                      f"{r['vs_bf16'] or float('nan'):.2f}x bf16  ({r['ms_per_step']:.2f} ms/step, "
                      f"wait {r['step_ms'].get('wait', 0):.2f}, forward {r['step_ms'].get('forward', 0):.2f})")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--sections", nargs="+", default=["checks", "gemm", "engine"], choices=["checks", "gemm", "engine"])
    ap.add_argument("--budget", type=float, default=90.0, help="seconds; later parts are skipped past it")
    ap.add_argument("--chat-requests", type=int, default=400, help="chat requests per engine (0: none)")
    args = ap.parse_args()
    start = time.time()
    failures: list = []
    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(DEV),
              "torch": torch.__version__}
    rows: list = []
    if "checks" in args.sections:
        rows += checks(failures)
        graph_check(failures, rows)
    if "gemm" in args.sections:
        got = qb.attempt(lambda: gemm(failures, rows, start, args.budget * 0.45))
        result["gemm"] = got if not isinstance(got, Exception) else repr(got)
        if not isinstance(got, Exception):
            result["w8a8_tuned"] = qb.attempt(lambda: summarize(got))
        print(f"gemm done at {time.time() - start:.0f} s", flush=True)
    result["checks"], result["failures"] = rows, failures
    print(f"\n{len(rows)} checks, {len(failures)} failed")
    for f in failures:
        print("FAILED", f)
    if failures:
        print(f"\n*** {len(failures)} CHECK FAILURE(S) ***\n")
    if "engine" in args.sections:
        got = qb.attempt(lambda: engines(start, args.budget, args.chat_requests))
        result["engine"] = got if not isinstance(got, Exception) else repr(got)
    result["seconds"] = round(time.time() - start, 1)
    path = args.json or os.path.join(BENCH, "results", f"fp8_{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\n{len(failures)} check failure(s); {result['seconds']} s; wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
