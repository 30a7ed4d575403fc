"""Where the FP8 engine's time goes (one GPU, Llama-3-8B shape): the paged decode kernel over a bf16 and an fp8
pool (every config checked against the torch reference before it is timed), the 8B GEMMs with and without
cuBLAS's FP8 fast accumulation (time, and error against float64), SwiGLU + FP8 launches on a
deferred-scale gate/up output (each checked bit for bit; the winners applied below), then per engine (bf16; FP8
weights; FP8 weights + FP8 KV) the device time of one 8,192-token prefill step and of a 256-sequence decode
step, kernel by kernel, grouped (GEMM, attention, quantization, norm, SwiGLU, rotary, KV write, LM head,
sampling, copies/casts, other). Then, while the budget lasts, the fixed workload's output tok/s per engine.

    python bench/fp8_where.py [--json PATH] [--budget 95] [--sections decode engine throughput]

Engines run eager under torch.profiler (every kernel shows by name; the decode CUDA graphs replay the same
kernels). Throughput engines run as served (CUDA graphs, async scheduling).
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

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

import quant as qb  # noqa: E402  (bench/quant.py: make_llm, free_gpu, attempt)

from kernels import paged_decode as pd  # noqa: E402
from kernels import silu_mul as sm  # noqa: E402
from kernels.fp8_quant import quantize_fp8_rows  # noqa: E402
from services.engine.attention.kv_quant import quantize_kv_fp8  # noqa: E402

DEV = qb.DEV
BLOCK = 16
# (label, batch, context): the fixed workload's decode (256 in + 0..256 out, mean ~384) and a long one
DECODE_SHAPES = [("b256 ctx384", 256, 384), ("b64 ctx2048", 64, 2048)]
HQ, HKV, D = 32, 8, 128


def decode_configs(fp8: bool) -> list[dict]:
    if not fp8:
        return [dict(TILE_N=64, num_warps=4, num_stages=2), dict(TILE_N=128, num_warps=4, num_stages=2)]
    out = [dict(TILE_N=64, num_warps=4, num_stages=2, F16_DOTS=False)]
    out += [dict(TILE_N=t, num_warps=w, num_stages=2, F16_DOTS=True) for t in (64, 128, 256) for w in (4, 8)]
    out += [dict(TILE_N=128, num_warps=4, num_stages=3, F16_DOTS=True)]
    out += [dict(TILE_N=t, num_warps=4, num_stages=2, F16_DOTS=True, CVT_BITS=True) for t in (64, 128)]
    return out


def make_pool(batch: int, ctx: int, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    blocks_per = -(-(ctx * 4 // 3) // BLOCK)  # lengths 2/3 ... 4/3 of ctx: mean ctx
    nblocks = batch * blocks_per
    kv = torch.randn(2, nblocks, BLOCK, HKV, D, device=DEV, dtype=torch.bfloat16, generator=g)
    tables = torch.randperm(nblocks, device=DEV, generator=g).to(torch.int32).view(batch, blocks_per)
    lens = torch.randint(max(1, ctx * 2 // 3), ctx * 4 // 3 + 1, (batch,), device=DEV, generator=g, dtype=torch.int32)
    q = torch.randn(batch, HQ, D, device=DEV, dtype=torch.bfloat16, generator=g)
    return q, kv, tables, lens


def decode_section(failures: list) -> list[dict]:
    import triton.testing

    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    copy = 2 * a.numel() / triton.testing.do_bench(lambda: b.copy_(a)) / 1e9
    del a, b
    print(f"copy ceiling {copy:.2f} TB/s", flush=True)
    rows = []
    for label, batch, ctx in DECODE_SHAPES:
        q, kv16, tables, lens = make_pool(batch, ctx)
        kv8 = quantize_kv_fp8(kv16.float(), 0.05, 0.04)  # values N(0,1) / scale: e4m3's whole range in use
        tokens, longest = int(lens.sum()), int(lens.max())  # on the host once: a .item() per call would time a sync
        scale = D ** -0.5
        for pool, kv, ks, vs, nbytes in (("bf16", kv16, 1.0, 1.0, 2), ("fp8", kv8, 0.05, 0.04, 1)):
            ref = pd.paged_decode_ref(q.float(), kv, tables, lens, scale, ks, vs)
            kv_bytes = tokens * HKV * D * 2 * nbytes
            for cfg in decode_configs(pool == "fp8"):
                def run(cfg=cfg):
                    return pd.paged_decode(q, kv, tables, lens, scale, max_seq_len=longest, num_splits=1,
                                           config=cfg, k_scale=ks, v_scale=vs)
                got = qb.attempt(run)
                if isinstance(got, Exception):
                    rows.append(dict(shape=label, pool=pool, config=cfg, ok=False, error=repr(got)[:200]))
                    print(f"decode {label} {pool} {cfg}: {repr(got)[:200]}", flush=True)
                    continue
                err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
                ok = err < 2e-2 and not got.isnan().any().item()
                qb.record(rows, failures, ok, check="paged_decode", shape=label, pool=pool, config=cfg, rel_err=err)
                if not ok:
                    continue
                ms = triton.testing.do_bench(run, warmup=10, rep=40)
                r = dict(shape=label, pool=pool, config=cfg, ok=True, rel_err=err, ms=ms, TBps=kv_bytes / ms / 1e9,
                         of_copy=kv_bytes / ms / 1e9 / copy)
                rows.append(r)
                print(f"decode {label:<12} {pool:<5} {str(cfg):<72} {ms * 1e3:8.1f} us {r['TBps']:5.2f} TB/s "
                      f"({r['of_copy']:.0%} of copy) err {err:.1e}", flush=True)
        del kv16, kv8
    print("\nPaged decode, best per (shape, pool) against bf16's default:")
    for label, _, _ in DECODE_SHAPES:
        timed = [r for r in rows if r.get("shape") == label and "ms" in r]
        base = next((r for r in timed if r["pool"] == "bf16"), None)
        for pool, f16, bits in (("bf16", None, None), ("fp8", False, None), ("fp8", True, None), ("fp8", True, True)):
            cand = [r for r in timed if r["pool"] == pool and r["config"].get("F16_DOTS") == f16
                    and r["config"].get("CVT_BITS") == bits]
            if cand and base:
                best = min(cand, key=lambda r: r["ms"])
                print(f"  {label:<12} {pool:<4} F16_DOTS={f16!s:<5} CVT_BITS={bits!s:<5} best {best['ms'] * 1e3:7.1f} us "
                      f"({base['ms'] / best['ms']:.2f}x bf16 default, {best['of_copy']:.0%} of copy) {best['config']}")
    cand = [r for r in rows if r.get("shape") == DECODE_SHAPES[0][0] and "ms" in r and r["config"].get("F16_DOTS")]
    if cand:  # the fixed workload's shape decides the engines' launch over an fp8 pool
        best = min(cand, key=lambda r: r["ms"])["config"]
        pd.FP8_KV_CONFIG.clear()
        pd.FP8_KV_CONFIG.update({k: v for k, v in best.items() if k != "F16_DOTS"})
        print(f"kernels/paged_decode.py FP8_KV_CONFIG (applied for the engines): {pd.FP8_KV_CONFIG!r}", flush=True)
    return rows


# --- cuBLAS FP8 GEMMs: fast accumulation ----------------------------------------------------------------
GEMM_MS = [256, 8192]


def gemm_section() -> list[dict]:
    """Per 8B GEMM at decode's and prefill's M: bf16, and _scaled_mm row-wise / tensor-wise, each with and without
    fast accumulation (ms, one CUDA graph over weight copies that overflow L2), and each FP8 output's error
    against the float64 product of the same quantized operands on 64 rows (max and mean |error| over max and
    mean |product|); "bf16 rounding" is the error of the exact product rounded to bfloat16, the floor."""
    from services.engine.model.quantization import fp8 as fp8mod

    g = torch.Generator(device=DEV).manual_seed(4)
    out = []
    one = torch.ones((), device=DEV)
    for m in GEMM_MS:
        for name, (k, n) in qb.SHAPES.items():
            bf = [(torch.randn(n, k, generator=g, device=DEV) * 0.02).to(torch.bfloat16)
                  for _ in range(qb.copies_for(2 * n * k))]
            f8 = [qb.fp8_layer(bf[i % len(bf)])[0] for i in range(qb.copies_for(n * k))]
            x = (torch.randn(m, k, generator=g, device=DEV) * (1 + 10 * torch.rand(m, 1, generator=g, device=DEV))
                 ).to(torch.bfloat16)
            xq, xs = quantize_fp8_rows(x)
            la = f8[0]
            ref = (xq[:64].double() * xs[:64].double()) @ (la.weight.double() * la.weight_scale.double().reshape(-1, 1)).t()

            def err(y):
                d = (y[:64].double() - ref).abs()
                return {"max": (d.max() / ref.abs().max()).item(), "mean": (d.mean() / ref.abs().mean()).item()}

            row = {"M": m, "shape": name, "ms": {}, "err": {"bf16 rounding": err(ref.to(torch.bfloat16))}}
            row["ms"]["bf16"] = qb.graph_ms([lambda w=w: torch.nn.functional.linear(x, w) for w in bf])
            for fast in (False, True):
                kw = {"use_fast_accum": True} if fast else {}
                tag = " fast" if fast else ""
                for kind, sa, sb in (("rowwise", xs, la.weight_scale), ("tensorwise", one, one)):
                    def mm(w, sa=sa, sb=sb, kw=kw):
                        return torch._scaled_mm(xq, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, **kw)
                    y = qb.attempt(lambda: mm(la.weight))
                    if isinstance(y, Exception):  # reported; the variant is left out of every decision
                        row["err"][kind + tag] = {"max": float("nan"), "mean": float("nan"), "error": repr(y)[:200]}
                        row["ms"][kind + tag] = float("nan")
                        continue
                    if kind == "tensorwise":
                        y = y.double()[:64] * xs[:64].double() * la.weight_scale.double()
                    row["err"][kind + tag] = err(y)
                    row["ms"][kind + tag] = qb.graph_ms([lambda w=la_.weight: mm(w) for la_ in f8])
            out.append(row)
            print(f"gemm M={m:<5} {name:<8}" + " ".join(f"{k_} {v * 1e3:.1f}us" for k_, v in row["ms"].items())
                  + " | err max/mean " + " ".join(f"{k_} {v['max']:.1e}/{v['mean']:.1e}" for k_, v in row["err"].items()),
                  flush=True)
            del bf, f8, ref
    torch.cuda.empty_cache()
    print("\nPer layer (4 GEMMs), ms:")
    for m in (256, 8192):
        rs = [r for r in out if r["M"] == m]
        if len(rs) == 4:
            tot = {k_: sum(r["ms"][k_] for r in rs) for k_ in rs[0]["ms"]}
            print(f"  M={m:<5} " + "  ".join(f"{k_} {v:.4f} ({tot['bf16'] / v:.2f}x)" for k_, v in tot.items()))
    print(f"  (FAST_ACCUM as committed: {fp8mod.FAST_ACCUM})")
    return out


# --- SwiGLU + FP8 on a deferred-scale gate/up output ----------------------------------------------------
SILU_MS = (256, 8192)
SILU_CANDIDATES = [{"ROWS": 4, "BLOCK": 512, "num_warps": 4}] + [  # round 1's winner at 256 ... 8192 rows, first
    dict({"ROWS": r, "BLOCK": b, "num_warps": w}, ROWS2=r2, BLOCK2=b2, warps2=w2) for (r, b, w), (r2, b2, w2) in (
        ((4, 512, 4), (8, 1024, 4)), ((4, 512, 4), (16, 1024, 8)), ((4, 512, 4), (4, 2048, 4)),
        ((4, 512, 4), (8, 2048, 8)), ((4, 512, 4), (32, 512, 4)), ((4, 512, 4), (2, 4096, 8)),
        ((8, 512, 4), (16, 1024, 8)), ((2, 1024, 4), (8, 1024, 4)))]
"""Round 2: the quantizing launch's own tiles (round 1 measured one program per row against the split launches
over 16 ... 8,192 rows and committed FP8_LAUNCH; its first entry, up to 64 rows, is kept)."""
INTER = 14336


def silu_section(failures: list) -> dict:
    """Each SILU_CANDIDATES launch per M, checked bit for bit against the unfused kernels, then timed (one CUDA
    graph of 4 calls); the winners per M go to kernels/silu_mul.py FP8_LAUNCH for the throughput section."""
    g = torch.Generator(device=DEV).manual_seed(2)
    rows, table = [], []
    gu, row, col = torch.ones(16, 2 * INTER, device=DEV, dtype=torch.bfloat16), torch.ones(16, 1, device=DEV), \
        torch.ones(1, 2 * INTER, device=DEV)
    qb.precompile([lambda c=c: sm.silu_mul_fp8(gu, scales=(row, col), split=c, warmup=True) if "ROWS" in c else
                   sm.silu_mul_fp8(gu, scales=(row, col), block=c["BLOCK"], num_warps=c["num_warps"], warmup=True)
                   for c in SILU_CANDIDATES])
    for m in SILU_MS:
        gu = (torch.randn(m, 2 * INTER, generator=g, device=DEV) * 40).to(torch.bfloat16)
        row = torch.rand(m, 1, generator=g, device=DEV) * 0.01
        col = torch.rand(1, 2 * INTER, generator=g, device=DEV) * 0.01
        want = quantize_fp8_rows(sm.silu_mul(gu, scales=(row, col)))
        t = {"silu (bf16 out)": qb.graph_ms([lambda: sm.silu_mul(gu, scales=(row, col))] * 4)}
        best = None
        for c in SILU_CANDIDATES:
            def run(c=c):
                if "ROWS" in c:
                    return sm.silu_mul_fp8(gu, scales=(row, col), split=c)
                return sm.silu_mul_fp8(gu, scales=(row, col), block=c["BLOCK"], num_warps=c["num_warps"])
            got = qb.attempt(run)
            ok = not isinstance(got, Exception) and torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) \
                and torch.equal(got[1], want[1])
            qb.record(rows, failures, ok, check="silu_mul_fp8_bits", M=m, config=c,
                      error=repr(got)[:200] if isinstance(got, Exception) else None)
            if not ok:
                continue
            ms = qb.graph_ms([run] * 4)
            t[str(c)] = ms
            if best is None or ms < best[1]:
                best = (c, ms)
        print(f"silu_fp8 M={m:<5} " + "  ".join(f"{k} {v * 1e3:.1f}us" for k, v in t.items()), flush=True)
        if best:
            print(f"  best {best[0]} {best[1] * 1e3:.1f} us (was {t.get(str(SILU_CANDIDATES[0]), float('nan')) * 1e3:.1f})")
            table.append((m, best[0]))
        rows.append({"M": m, "ms": t})
    measured = dict(table)
    launch = [e for e in sm.FP8_LAUNCH if e[0] <= 64]
    if 256 in measured:
        launch.append((1024, measured[256]))
    if 8192 in measured:
        launch.append((1 << 30, measured[8192]))
    launch += [e for e in sm.FP8_LAUNCH if e[0] > 64 and not any(b >= e[0] for b, _ in launch)]
    sm.FP8_LAUNCH[:] = launch
    print(f"kernels/silu_mul.py FP8_LAUNCH (applied for the throughput section): {launch!r}", flush=True)
    return {"rows": rows, "FP8_LAUNCH": launch}


# --- the FP8 method's producer kernels (kernels/fp8_fused.py) and the quantization launch ----------------
PRODUCER_MS = (256, 8192)
NORM_WARPS = (None, 4, 8)
"""The norm's num_warps candidates (None: fused_norm's choice, 16 at hidden 4096; others may sum in another order
and are applied only where their bits equal the unfused reference's)."""
SWIGLU_QUANT = [{}, {"ROWS": 8}, {"ROWS": 2, "BLOCK": 1024}, {"ROWS": 4, "BLOCK": 1024, "num_warps": 8},
                {"ROWS2": 2, "BLOCK2": 1024}]
"""Changes to the committed SwiGLU + FP8 launch tried with hardware rounding ({}: as committed): the first launch's
tiles (ROWS, BLOCK, num_warps), the quantizing one's (ROWS2, BLOCK2, warps2). Round 3 (with ROWS2 8 x BLOCK2
1024 only) kept the committed tiles."""


def producers_section(failures: list) -> dict:
    """At 256 and 8,192 rows (Llama-3-8B: hidden 4096, intermediate 14336), each checked bit for bit against the
    unfused kernels followed by the software-rounding quantizer before it is timed (one CUDA graph of 4 calls):
    add + RMSNorm + FP8 with deferred scales (kernels/fused_norm.py's, then kernels/fp8_fused.py's with software
    and hardware e4m3 rounding and NORM_WARPS), SwiGLU + FP8 (fp8_fused's, SWIGLU_QUANT), and kernels/fp8_quant.py's
    activation quantization (software, hardware rounding). Applies HW_CVT (kernels/fp8_quant.py) where every
    hardware-rounding launch matched and was no slower in total, and fp8_fused's NORM_LAUNCH / FP8_LAUNCH
    winners."""
    from kernels import fp8_fused, fp8_quant
    from kernels import fused_norm as fn
    from services.engine.model.quantization import fp8 as fp8mod

    g = torch.Generator(device=DEV).manual_seed(8)
    x, w = torch.ones(4, 4096, device=DEV, dtype=torch.bfloat16), torch.ones(4096, device=DEV, dtype=torch.bfloat16)
    xs = (torch.ones(4, 1, device=DEV), torch.ones(1, 4096, device=DEV))
    gu, sc = torch.ones(4, 2 * INTER, device=DEV, dtype=torch.bfloat16), (torch.ones(4, 1, device=DEV),
                                                                         torch.ones(1, 2 * INTER, device=DEV))
    jobs = [lambda hw=hw, nw=nw: fp8_fused.add_rms_norm_fp8(x, x.clone(), w, 1e-5, x_scales=xs, hw_cvt=hw,
                                                           num_warps=nw, warmup=True)
            for hw in (False, True) for nw in (NORM_WARPS if hw else (None,))]
    for m in PRODUCER_MS:
        base = next((c for most, c in sm.FP8_LAUNCH if m <= most), fp8_fused.SPLIT_DEFAULT)
        s_m = sc if m <= fp8mod.DEFER_MAX_M.get((2 * INTER, 4096), m) else None  # as below
        jobs += [lambda hw=hw, c=dict(base, **e), s_m=s_m: fp8_fused.silu_mul_fp8(gu, scales=s_m, split=c,
                                                                                  hw_cvt=hw, warmup=True)
                 for hw in (False, True) for e in (SWIGLU_QUANT if hw else ({},))]
    qb.precompile(jobs)
    rows, out = [], {"ms": {}}
    hw_ok, tot = True, {"soft": 0.0, "hw": 0.0}
    norm_best, swiglu_best = {}, {}
    for m in PRODUCER_MS:
        x = (torch.randn(m, 4096, generator=g, device=DEV) * 30).to(torch.bfloat16)
        res = torch.randn(m, 4096, generator=g, device=DEV).to(torch.bfloat16)
        w = (1 + 0.1 * torch.randn(4096, generator=g, device=DEV)).to(torch.bfloat16)
        xs = (torch.rand(m, 1, generator=g, device=DEV) * 0.01, torch.rand(1, 4096, generator=g, device=DEV) * 0.01)
        # the reference: the unfused norm, then the software-rounding quantizer
        want = quantize_fp8_rows(fn.add_rms_norm(x, res.clone(), w, 1e-5, x_scales=xs), hw_cvt=False)
        t = {"fused_norm's": qb.graph_ms([lambda r=res.clone(): fn.add_rms_norm_fp8(x, r, w, 1e-5, x_scales=xs)] * 4)}
        for hw in (False, True):
            for nw in NORM_WARPS if hw else (None,):
                def run(hw=hw, nw=nw, r=res.clone()):
                    return fp8_fused.add_rms_norm_fp8(x, r, w, 1e-5, x_scales=xs, hw_cvt=hw, num_warps=nw)
                got = qb.attempt(lambda: run(r=res.clone()))
                ok = not isinstance(got, Exception) and torch.equal(got[0].view(torch.uint8), want[0].view(
                    torch.uint8)) and torch.equal(got[1], want[1])
                tag = f"{'hw' if hw else 'soft'} warps {nw or 'default'}"
                if nw is None:  # fused_norm's reduction order: a mismatch is a failure
                    qb.record(rows, failures, ok, check="norm_fp8_bits", M=m, variant=tag,
                              error=repr(got)[:200] if isinstance(got, Exception) else None)
                    hw_ok &= ok or not hw
                if not ok:
                    print(f"norm_fp8 M={m} {tag}: bits differ from the unfused reference (not applied)", flush=True)
                    continue
                t[tag] = qb.graph_ms([run] * 4)
                if hw and (m not in norm_best or t[tag] < norm_best[m][1]):
                    norm_best[m] = (nw, t[tag])
        tot["soft"] += t.get("soft warps default", float("nan"))
        tot["hw"] += t.get("hw warps default", float("nan"))
        out["ms"][f"norm M={m}"] = t
        print(f"norm_fp8 M={m:<5} " + "  ".join(f"{k} {v * 1e3:.1f}us" for k, v in t.items()), flush=True)

        # gate_up's output as the engine hands it over at m rows: unscaled (FP8Output.raw) where it defers its scales
        scaled = m <= fp8mod.DEFER_MAX_M.get((2 * INTER, 4096), m)
        gu = (torch.randn(m, 2 * INTER, generator=g, device=DEV) * (40 if scaled else 0.4)).to(torch.bfloat16)
        sc = (torch.rand(m, 1, generator=g, device=DEV) * 0.01,
              torch.rand(1, 2 * INTER, generator=g, device=DEV) * 0.01) if scaled else None
        want = quantize_fp8_rows(sm.silu_mul(gu, scales=sc), hw_cvt=False)  # unfused, software rounding
        base = next((c for most, c in sm.FP8_LAUNCH if m <= most), fp8_fused.SPLIT_DEFAULT)
        t = {}
        for hw in (False, True):
            for extra in SWIGLU_QUANT if hw else ({},):
                cfg = dict(base, **extra)
                def run(hw=hw, cfg=cfg):
                    return fp8_fused.silu_mul_fp8(gu, scales=sc, split=cfg, hw_cvt=hw)
                got = qb.attempt(run)
                ok = not isinstance(got, Exception) and torch.equal(got[0].view(torch.uint8), want[0].view(
                    torch.uint8)) and torch.equal(got[1], want[1])
                tag = f"{'hw' if hw else 'soft'} {extra or 'committed tiles'}"
                qb.record(rows, failures, ok, check="swiglu_fp8_bits", M=m, variant=tag,
                          error=repr(got)[:200] if isinstance(got, Exception) else None)
                hw_ok &= ok or not hw
                if not ok:
                    continue
                t[tag] = qb.graph_ms([run] * 4)
                if hw and (m not in swiglu_best or t[tag] < swiglu_best[m][1]):
                    swiglu_best[m] = (cfg, t[tag])
        tot["soft"] += t.get("soft committed tiles", float("nan"))
        tot["hw"] += t.get("hw committed tiles", float("nan"))
        out["ms"][f"swiglu M={m}"] = t
        print(f"swiglu_fp8 M={m:<5} {'scaled' if scaled else 'unscaled'} "
              + "  ".join(f"{k} {v * 1e3:.1f}us" for k, v in t.items()), flush=True)

        a = (torch.randn(m, 4096, generator=g, device=DEV) * 3).to(torch.bfloat16)
        want = quantize_fp8_rows(a, hw_cvt=False)
        got = quantize_fp8_rows(a, hw_cvt=True)
        ok = torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])
        qb.record(rows, failures, ok, check="quant_rows_hw_bits", M=m)
        hw_ok &= ok
        t = {hw: qb.graph_ms([lambda hw=hw: quantize_fp8_rows(a, hw_cvt=hw)] * 4) for hw in (False, True)}
        tot["soft"] += t[False]
        tot["hw"] += t[True]
        out["ms"][f"quant M={m}"] = {str(k): v for k, v in t.items()}
        print(f"quant_rows M={m:<5} soft {t[False] * 1e3:.1f}us  hw {t[True] * 1e3:.1f}us", flush=True)
        del x, res, gu, a
    fp8_quant.HW_CVT = hw_ok and tot["hw"] <= tot["soft"] * 1.01
    fp8_fused.NORM_LAUNCH[:] = [(1024 if m == 256 else 1 << 30, nw) for m, (nw, _) in sorted(norm_best.items())] \
        if fp8_quant.HW_CVT else []
    if fp8_quant.HW_CVT and 256 in swiglu_best and 8192 in swiglu_best:
        sm.FP8_LAUNCH[:] = [e for e in sm.FP8_LAUNCH if e[0] <= 64] + [(1024, swiglu_best[256][0]),
                                                                       (1 << 30, swiglu_best[8192][0])]
    out["applied"] = {"HW_CVT": fp8_quant.HW_CVT, "NORM_LAUNCH": list(fp8_fused.NORM_LAUNCH),
                      "FP8_LAUNCH": list(sm.FP8_LAUNCH), "total_ms": tot}
    out["checks"] = rows
    print(f"producers: software rounding {tot['soft'] * 1e3:.1f} us, hardware {tot['hw'] * 1e3:.1f} us over the "
          f"timed calls; applied {out['applied']}", flush=True)
    return out


def fast_accum_prefill(gemm_rows) -> dict:
    """FAST_ACCUM_MIN_M (quantization/fp8.py) = 4097 (prefill rows, where o and down scale their own output,
    row-wise) when the gemm section measured every 8B GEMM's fast-accumulation error at 8,192 rows within 1e-2 of
    the largest output and the layer 1% faster or more, else None; gate_up then scales its own output there too
    (DEFER_MAX_M) if its row-wise fast GEMM beat the tensor-wise one, else it defers at every M."""
    from services.engine.model.quantization import fp8 as fp8mod

    rs = {r["shape"]: r for r in gemm_rows or [] if r["M"] == 8192}
    if len(rs) != 4:
        return {"applied": None}
    errs = [rs[k]["err"].get(kind + " fast", {}).get("max", 1.0) for k in rs for kind in ("rowwise", "tensorwise")]
    gu = rs["gate_up"]["ms"]
    gu_rowwise = gu["rowwise fast"] < gu["tensorwise fast"]

    def layer(tag, gate_up_kind="tensorwise"):
        return sum(rs[k]["ms"]["rowwise" + tag] for k in ("qkv", "o", "down")) + gu[gate_up_kind + tag]

    now, fast = layer(""), layer(" fast", "rowwise" if gu_rowwise else "tensorwise")
    ok = all(e <= 1e-2 for e in errs) and now / fast >= 1.01  # a NaN error (the variant failed) is not ok
    fp8mod.FAST_ACCUM_MIN_M = 4097 if ok else None
    if ok and gu_rowwise:
        fp8mod.DEFER_MAX_M[(28672, 4096)] = 4096
    else:  # gate_up tensor-wise at every M, its scales applied by SwiGLU (as before round 3)
        fp8mod.DEFER_MAX_M.pop((28672, 4096), None)
    print(f"fast accumulation at 8,192 rows: layer {now:.3f} -> {fast:.3f} ms ({now / fast:.3f}x; gate_up "
          f"{'row' if gu_rowwise else 'tensor'}-wise), max error {max(errs):.1e}; applied FAST_ACCUM_MIN_M "
          f"{fp8mod.FAST_ACCUM_MIN_M}, DEFER_MAX_M {fp8mod.DEFER_MAX_M}", flush=True)
    return {"gain": now / fast, "max_err": max(errs), "applied": fp8mod.FAST_ACCUM_MIN_M,
            "DEFER_MAX_M": {str(k): v for k, v in fp8mod.DEFER_MAX_M.items()}}


# --- what the engines run, as committed ------------------------------------------------------------------
def committed_section(failures: list) -> list[dict]:
    """GPU checks of the committed defaults before the throughput engines use them: the decode kernel over an fp8
    pool with FP8_KV_CONFIG against the torch reference (and its time against the bf16 pool's); SwiGLU + FP8
    with FP8_LAUNCH bit for bit at several row counts; each 8B GEMM through FP8Method as the engine calls it
    (row-wise, and deferred: tensor-wise + the scales applied in float64) with FAST_ACCUM as committed, against
    the float64 product of the same quantized operands (64 rows)."""
    import triton.testing

    from services.engine.model.quantization import fp8 as fp8mod

    rows: list = []
    q, kv16, tables, lens = make_pool(256, 384)
    kv8 = quantize_kv_fp8(kv16.float(), 0.05, 0.04)
    times, longest = {}, int(lens.max())
    for pool, kv, ks, vs in (("bf16", kv16, 1.0, 1.0), ("fp8", kv8, 0.05, 0.04)):
        def run(kv=kv, ks=ks, vs=vs):
            return pd.paged_decode(q, kv, tables, lens, D ** -0.5, max_seq_len=longest, k_scale=ks, v_scale=vs)
        ref = pd.paged_decode_ref(q.float(), kv, tables, lens, D ** -0.5, ks, vs)
        err = ((run().float() - ref).abs().max() / ref.abs().max()).item()
        qb.record(rows, failures, err < 2e-2, check="decode_committed", pool=pool, config=dict(pd.FP8_KV_CONFIG),
                  rel_err=err)
        times[pool] = triton.testing.do_bench(run, warmup=10, rep=40)
    print(f"decode b256 ctx384, committed launches: bf16 pool {times['bf16'] * 1e3:.1f} us, fp8 pool "
          f"{times['fp8'] * 1e3:.1f} us ({times['bf16'] / times['fp8']:.2f}x; FP8_KV_CONFIG {pd.FP8_KV_CONFIG})",
          flush=True)
    del kv16, kv8
    g = torch.Generator(device=DEV).manual_seed(6)
    for m in (1, 16, 255, 256, 2048, 8192):
        gu = (torch.randn(m, 2 * INTER, generator=g, device=DEV) * 40).to(torch.bfloat16)
        sc = (torch.rand(m, 1, generator=g, device=DEV) * 0.01, torch.rand(1, 2 * INTER, generator=g, device=DEV) * 0.01)
        got, want = sm.silu_mul_fp8(gu, scales=sc), quantize_fp8_rows(sm.silu_mul(gu, scales=sc))
        ok = torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])
        qb.record(rows, failures, ok, check="silu_fp8_committed", M=m)
    for m in (256, 8192):
        for name, (k, n) in qb.SHAPES.items():
            layer = qb.fp8_layer((torch.randn(n, k, generator=g, device=DEV) * 0.02).to(torch.bfloat16))[0]
            x = (torch.randn(m, k, generator=g, device=DEV) * (1 + 10 * torch.rand(m, 1, generator=g, device=DEV))
                 ).to(torch.bfloat16)
            xq, xs = quantize_fp8_rows(x)
            ref = (xq[:64].double() * xs[:64].double()) @ (layer.weight.double() * layer.weight_scale.double().reshape(-1, 1)).t()
            method = fp8mod.FP8Method("bench")
            layer.params_dtype = torch.bfloat16
            for deferred in (False, True):
                layer.fp8_deferred_scales = deferred
                y = method.apply(layer, fp8mod.FP8Input(xq, xs), None)
                if isinstance(y, fp8mod.FP8Output):
                    y = y.raw.double()[:64] * y.row[:64].double() * y.col.double()
                else:  # not deferred, or above DEFER_MAX_M's bound
                    y = y[:64].double()
                err = ((y - ref).abs().max() / ref.abs().max()).item()
                qb.record(rows, failures, err < 1e-2, check="gemm_committed", M=m, shape=name, deferred=deferred,
                          fast_accum=fp8mod.FAST_ACCUM, rel_err=err)
    bad = [r for r in rows if not r["ok"]]
    print(f"committed checks: {len(rows)} run, {len(bad)} failed; FAST_ACCUM {fp8mod.FAST_ACCUM}, FP8_LAUNCH "
          f"{sm.FP8_LAUNCH}", flush=True)
    return rows


# --- engines under the profiler --------------------------------------------------------------------------
GROUPS = [  # (group, substrings of a kernel's lower-cased name), first match wins
    ("gemm_fp8", ("w8a8", "fp8_w8a16", "e4m3", "f8f8", "fp8")),
    ("gemm_bf16", ("nvjet", "gemm", "sm90_xmma", "cutlass", "cublas", "splitk")),
    ("attention", ("paged", "reduce_splits")),
    ("silu", ("silu", "quant_by_parts")),
    ("quant", ("quant_rows",)),
    ("norm", ("add_norm", "rms")),
    ("rotary", ("rotary",)),
    ("kv_write", ("reshape_and_cache",)),
    ("sampling", ("greedy", "softmax", "argmax", "topk", "sort", "multinomial")),
    ("copy/cast", ("copy", "cast", "convert", "to_copy", "fill", "index", "gather", "scatter", "cat")),
]


def group_of(name: str) -> str:
    n = name.lower()
    for g, keys in GROUPS:
        if any(k in n for k in keys):
            return g
    return "other"


def kernels_of(prof, steps: int) -> list[dict]:
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.count and not ev.key.startswith(("cudaLaunch", "cudaMemcpy", "cudaStream", "cudaEvent",
                                                     "cudaFunc", "cudaDevice", "cudaGraph")):
            rows.append({"kernel": ev.key, "ms": t / 1e3 / steps, "calls": ev.count / steps, "group": group_of(ev.key)})
    rows.sort(key=lambda r: -r["ms"])
    return rows


def summarize(label: str, kind: str, rows: list[dict]) -> dict:
    total = sum(r["ms"] for r in rows)
    groups: dict = {}
    for r in rows:
        groups[r["group"]] = groups.get(r["group"], 0.0) + r["ms"]
    print(f"\n{label} {kind}: {total:.2f} ms of device time per step; "
          + ", ".join(f"{g} {v:.2f}" for g, v in sorted(groups.items(), key=lambda kv: -kv[1])), flush=True)
    for r in rows[:22]:
        print(f"  {r['ms']:8.3f} ms {r['calls']:6.0f}x  {r['group']:<13}{r['kernel'][:100]}")
    return {"engine": label, "step": kind, "device_ms": total, "groups_ms": groups, "kernels": rows[:60]}


def profile_engine(label: str, weights: str, kv: str, prompt_len: int = 384, seqs: int = 256,
                   decode_steps: int = 6) -> list[dict]:
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from folio import SamplingParams

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        llm = qb.make_llm(tmp, weights, max_model_len=prompt_len + 128, max_num_seqs=seqs, enforce_eager=True,
                          async_scheduling=False, gpu_memory_utilization=0.85, kv_cache_dtype=kv)
        engine = llm.engine
        rng = np.random.default_rng(0)
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        for i in range(seqs):
            engine.add_request(f"r{i}", None, params, stream=False,
                               prompt_token_ids=rng.integers(3, engine.vocab_size, prompt_len).tolist())
        engine.step()  # the first 8,192 prompt tokens
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:  # the next: as the fixed workload's steps 2-8
            engine.step()
            torch.cuda.synchronize()
        out.append(summarize(label, "prefill step (8,192 tokens + the first prompts' decode rows)",
                             kernels_of(prof, 1)))
        while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                              for s in engine.scheduler.running):
            engine.step()
        for _ in range(2):
            engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(decode_steps):
                engine.step()
            torch.cuda.synchronize()
        out.append(summarize(label, f"decode step ({seqs} seqs, ctx ~{prompt_len + 4})", kernels_of(prof, decode_steps)))
        out[-1]["kv_blocks"] = engine.blocks.num_blocks
        llm.shutdown()
        del llm, engine
    qb.free_gpu()
    return out


AB_DECODE = [dict(TILE_N=t, num_warps=w, num_stages=st) for t, w, st in (
    (64, 4, 2), (64, 4, 3), (64, 4, 1), (64, 8, 1), (32, 4, 1), (128, 4, 1), (128, 8, 1), (32, 4, 2))] + [
    dict(TILE_N=t, num_warps=w, num_stages=1, PREFETCH=True) for t, w in ((32, 4), (64, 4), (64, 8), (128, 4))] + [
    dict(TILE_N=64, num_warps=4, num_stages=2, F16_DOTS=False)]
"""The decode launches over an fp8 pool that the A/B section times inside the engine (F16_DOTS unless it says)."""


def check_ab_decode(failures: list) -> list[dict]:
    """Each AB_DECODE launch against the torch reference on a small fp8 pool (16 sequences, ~300 tokens; the
    launches compile here); the ones that pass go to the A/B."""
    q, kv16, tables, lens = make_pool(16, 300, seed=5)
    kv8 = quantize_kv_fp8(kv16.float(), 0.05, 0.04)
    ref = pd.paged_decode_ref(q.float(), kv8, tables, lens, D ** -0.5, 0.05, 0.04)
    rows: list = []
    qb.precompile([lambda c=c: pd.paged_decode(q, kv8, tables, lens, D ** -0.5, num_splits=1, config=c, k_scale=0.05,
                                               v_scale=0.04, warmup=True) for c in AB_DECODE])
    good = []
    for cfg in AB_DECODE:
        got = qb.attempt(lambda: pd.paged_decode(q, kv8, tables, lens, D ** -0.5, num_splits=1, config=cfg,
                                                 k_scale=0.05, v_scale=0.04))
        err = float("inf") if isinstance(got, Exception) else ((got.float() - ref).abs().max() / ref.abs().max()).item()
        qb.record(rows, failures, err < 2e-2, check="ab_decode", config=cfg, rel_err=err,
                  error=repr(got)[:200] if isinstance(got, Exception) else None)
        if err < 2e-2:
            good.append(cfg)
    print(f"decode launches checked against the reference: {len(good)} of {len(AB_DECODE)} pass", flush=True)
    AB_DECODE[:] = good
    return rows


def ab_section(gemm_rows) -> dict:
    """One FP8-weights + FP8-KV engine (eager) with 256 sequences at ~388 tokens: each AB_DECODE launch (all compiled
    in parallel first) for 2 decode steps under the profiler, the decode attention's device time per step; then
    FAST_ACCUM off and on, the GEMMs' device time per step. Applies the fastest decode launch (FP8_KV_CONFIG) and
    FAST_ACCUM where the gemm section measured its error within 1e-2 of the largest product at every shape and it
    is no slower (1%) in the engine's decode steps nor in the gemm section's 8,192-row layer, and faster in one
    (FAST_ACCUM stays off without the gemm section); and DEFER_MAX_M for o and down where the gemm section's
    row-wise GEMM at 8,192 rows beat tensor-wise plus the norm's scaling; for the sections after this one."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from folio import SamplingParams
    from services.engine.model.quantization import fp8 as fp8mod

    def device_ms(steps: int, pick) -> float:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        return sum(r["ms"] for r in kernels_of(prof, steps) if pick(r))

    out: dict = {"decode": [], "fast_accum": {}}
    with tempfile.TemporaryDirectory() as tmp:
        llm = qb.make_llm(tmp, "fp8", max_model_len=384 + 160, max_num_seqs=256, enforce_eager=True,
                          async_scheduling=False, gpu_memory_utilization=0.85, kv_cache_dtype="fp8")
        engine = llm.engine
        rng = np.random.default_rng(0)
        params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
        for i in range(256):
            engine.add_request(f"r{i}", None, params, stream=False,
                               prompt_token_ids=rng.integers(3, engine.vocab_size, 384).tolist())
        kv = engine.runner.kv_caches[0]
        q = torch.zeros(4, HQ, D, device=DEV, dtype=torch.bfloat16)
        tables = torch.zeros(4, 4, device=DEV, dtype=torch.int32)
        lens = torch.ones(4, device=DEV, dtype=torch.int32)
        qb.precompile([lambda c=c: pd.paged_decode(q, kv, tables, lens, D ** -0.5, num_splits=1, config=c, warmup=True)
                       for c in AB_DECODE])  # the engine's pool may specialize differently from the check's
        while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                              for s in engine.scheduler.running):
            engine.step()
        engine.step()
        saved = dict(pd.FP8_KV_CONFIG)
        for cfg in AB_DECODE:
            pd.FP8_KV_CONFIG.clear()
            pd.FP8_KV_CONFIG.update(cfg)
            engine.step()  # compiles here if the parallel compile missed this launch
            ms = device_ms(2, lambda r: r["kernel"].startswith("_paged_decode_kernel"))
            out["decode"].append({"config": cfg, "attention_ms_per_step": ms})
            print(f"A/B decode over fp8 {str(cfg):<72} attention {ms:.3f} ms/step", flush=True)
        best = min(out["decode"], key=lambda r: r["attention_ms_per_step"])
        pd.FP8_KV_CONFIG.clear()
        pd.FP8_KV_CONFIG.update(best["config"] if best["attention_ms_per_step"] < 0.99 * out["decode"][0][
            "attention_ms_per_step"] else saved)
        saved_fast = fp8mod.FAST_ACCUM
        for fast in (False, True, False, True):
            fp8mod.FAST_ACCUM = fast
            try:
                engine.step()
            except Exception as e:  # e.g. no fast accumulation in this torch's row-wise kernel: stays off
                print(f"A/B FAST_ACCUM {fast}: {e!r}"[:300], flush=True)
                out["fast_accum"].setdefault(str(fast), []).append(float("inf"))
                fp8mod.FAST_ACCUM = False
                break
            ms = device_ms(2, lambda r: r["group"] in ("gemm_fp8", "gemm_bf16"))
            out["fast_accum"].setdefault(str(fast), []).append(ms)
            print(f"A/B FAST_ACCUM {fast!s:<5} GEMMs {ms:.3f} ms/step", flush=True)
        llm.shutdown()
        del llm, engine
    qb.free_gpu()
    on, off = min(out["fast_accum"].get("True", [float("inf")])), min(out["fast_accum"]["False"])
    errs = [r["err"].get("rowwise fast", {}).get("max", 1.0) for r in gemm_rows or []] + \
        [r["err"].get("tensorwise fast", {}).get("max", 1.0) for r in gemm_rows or []]
    fast_ok = bool(errs) and all(e <= 1e-2 for e in errs)  # a NaN (the variant failed) is not ok

    def layer_8192(tag: str) -> float:  # the engine's prefill GEMMs: row-wise qkv, tensor-wise o, gate_up, down
        rs = {r["shape"]: r["ms"] for r in gemm_rows or [] if r["M"] == 8192}
        if len(rs) != 4:
            return float("nan")
        return rs["qkv"]["rowwise" + tag] + sum(rs[k]["tensorwise" + tag] for k in ("o", "gate_up", "down"))

    gains = (off / on if on > 0 else 1.0, layer_8192("") / layer_8192(" fast"))  # decode (engine), prefill (layer)
    out["fast_accum_gain"] = {"decode": gains[0], "prefill_layer": gains[1]}
    fp8mod.FAST_ACCUM = (fast_ok and min(gains) >= 0.99 and max(gains) >= 1.01) if gemm_rows else saved_fast
    # At prefill's 8,192 rows row-wise may beat tensor-wise + the norm's scaling (~6 us at 8,192 rows: bench/fp8.py's
    # previous round 2, norm_fp8_scaled 0.0799 vs norm_fp8 0.0739 ms): o and down then scale their own output there.
    rs = {r["shape"]: r["ms"] for r in gemm_rows or [] if r["M"] == 8192}
    tag = " fast" if fp8mod.FAST_ACCUM else ""
    for name, key in (("o", (4096, 4096)), ("down", (4096, 14336))):
        if name in rs and rs[name]["rowwise" + tag] < rs[name]["tensorwise" + tag] + 0.006:
            fp8mod.DEFER_MAX_M[key] = 4096
    out["applied"] = {"FP8_KV_CONFIG": dict(pd.FP8_KV_CONFIG), "FAST_ACCUM": fp8mod.FAST_ACCUM,
                      "DEFER_MAX_M": {str(k): v for k, v in fp8mod.DEFER_MAX_M.items()},
                      "fast_accum_max_err": max(errs, default=None)}
    print(f"A/B: decode over fp8 best {best['config']} {best['attention_ms_per_step']:.3f} ms/step (first listed "
          f"{out['decode'][0]['attention_ms_per_step']:.3f}); GEMMs fast accumulation {on:.3f} vs {off:.3f} ms/step, "
          f"prefill layer gain {gains[1]:.3f}x, "
          f"max error {max(errs, default=float('nan')):.1e}; applied {out['applied']}", flush=True)
    return out


def throughput(label: str, weights: str, kv: str, chat_requests: int = 0, prompts: int = 256,
               length: int = 256, **engine_kw) -> list[dict]:
    """The fixed workload (256 x 256 in / 256 out; a warm-up pass over its first 64 prompts first), then the chat
    workload's first `chat_requests` (bench/throughput.py's), on one engine as served (`engine_kw`: further
    EngineConfig options)."""
    import numpy as np

    import throughput as tb
    from folio import SamplingParams

    rng = np.random.default_rng(0)
    works = [("fixed", [(rng.integers(3, 128256, length).tolist(), length) for _ in range(prompts)])]
    if chat_requests:
        works.append(("chat", tb.make_workload("chat", 128256, chat_requests)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        llm = qb.make_llm(tmp, weights, max_model_len=max(len(p) + o for _, w in works for p, o in w) + 16,
                          max_num_seqs=256, gpu_memory_utilization=0.9, kv_cache_dtype=kv, **engine_kw)
        startup = time.time() - t0
        for wname, work in works:
            ps = [{"prompt_token_ids": p} for p, _ in work]
            llm.generate(ps[:64], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
            params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = llm.generate(ps, params, use_tqdm=False)
            torch.cuda.synchronize()
            secs = time.perf_counter() - t
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            blocks = llm.engine.blocks.num_blocks
            rows.append({"engine": label, "workload": wname, "output_tok_s": n / secs, "seconds": secs,
                         "startup_s": startup, "kv_blocks": blocks})
            print(f"throughput {label:<16} {wname:<6} {n / secs:8.0f} output tok/s ({secs:.2f} s; startup "
                  f"{startup:.0f} s, {blocks} KV blocks)", flush=True)
            del outs
        llm.shutdown()
        del llm
    qb.free_gpu()
    return rows


ENGINES = [("fp8 + fp8 KV", "fp8", "fp8"), ("fp8", "fp8", "auto"), ("bf16", "bf16", "auto")]
"""In this order, so that a short budget drops the known one (bf16: docs/performance.md has its profile)."""
THROUGHPUT_ENGINES = [("bf16", "bf16", "auto"), ("fp8", "fp8", "auto"), ("fp8 + fp8 KV", "fp8", "fp8")]
"""bf16 and FP8 weights first (the headline ratio), FP8 + FP8 KV last (the same weights: its pool's blocks
against the FP8 engine's are the tokens that fit at the same memory utilization)."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--budget", type=float, default=95.0, help="seconds; later parts are skipped past it")
    ap.add_argument("--gemm-ms", type=int, nargs="+", default=GEMM_MS, help="the gemm section's row counts")
    ap.add_argument("--chat-requests", type=int, default=0, help="chat requests per 16-bit-KV throughput engine")
    ap.add_argument("--sections", nargs="+", default=["decode", "gemm", "silu", "engine", "throughput"],
                    choices=["decode", "gemm", "silu", "producers", "ab", "committed", "engine", "throughput"])
    args = ap.parse_args()
    GEMM_MS[:] = args.gemm_ms
    start = time.time()
    failures: list = []
    result: dict = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(DEV),
                    "torch": torch.__version__, "command": "python bench/fp8_where.py " + " ".join(sys.argv[1:])}
    if "decode" in args.sections:
        result["decode"] = qb.attempt(lambda: decode_section(failures))
        print(f"decode section done at {time.time() - start:.0f} s", flush=True)
    if "gemm" in args.sections:
        result["gemm"] = qb.attempt(gemm_section)
        print(f"gemm section done at {time.time() - start:.0f} s", flush=True)
    if "silu" in args.sections:
        result["silu"] = qb.attempt(lambda: silu_section(failures))
        print(f"silu section done at {time.time() - start:.0f} s", flush=True)
    if "producers" in args.sections:
        result["producers"] = qb.attempt(lambda: producers_section(failures))
        if not isinstance(result["producers"], dict):
            print(f"producers: {result['producers']!r}"[:400], flush=True)
        if isinstance(result.get("gemm"), list) and "ab" not in args.sections:
            result["fast_accum_prefill"] = qb.attempt(lambda: fast_accum_prefill(result["gemm"]))
        print(f"producers section done at {time.time() - start:.0f} s", flush=True)
    if "ab" in args.sections:
        result["ab_checks"] = qb.attempt(lambda: check_ab_decode(failures))
        gemm_rows = result.get("gemm") if isinstance(result.get("gemm"), list) else None
        result["ab"] = qb.attempt(lambda: ab_section(gemm_rows))
        if not isinstance(result["ab"], dict):
            print(f"ab: {result['ab']!r}"[:400], flush=True)
            qb.free_gpu()
        print(f"ab section done at {time.time() - start:.0f} s", flush=True)
    if "committed" in args.sections:
        result["committed"] = qb.attempt(lambda: committed_section(failures))
        print(f"committed checks done at {time.time() - start:.0f} s", flush=True)
    if "engine" in args.sections:
        result["profiles"] = []
        for label, weights, kv in ENGINES:
            if time.time() - start > args.budget - 12:
                print(f"profile {label}: skipped (time budget)", flush=True)
                continue
            got = qb.attempt(lambda: profile_engine(label, weights, kv))
            result["profiles"] += got if isinstance(got, list) else [{"engine": label, "error": repr(got)[:300]}]
            if not isinstance(got, list):
                print(f"profile {label}: {got!r}"[:400], flush=True)
                qb.free_gpu()
            print(f"profile {label} done at {time.time() - start:.0f} s", flush=True)
    if "throughput" in args.sections:
        result["throughput"] = []
        cost = 20.0  # an 8B engine's start-up and fixed workload (round 2: ~21 s cold); then the last one's
        for label, weights, kv in THROUGHPUT_ENGINES:
            if time.time() - start + cost > args.budget:
                print(f"throughput {label}: skipped (time budget: {time.time() - start:.0f} s + ~{cost:.0f} s)",
                      flush=True)
                continue
            chat = args.chat_requests if kv == "auto" and time.time() - start < args.budget - 40 else 0
            t_engine = time.time()
            got = qb.attempt(lambda: throughput(label, weights, kv, chat))
            cost = time.time() - t_engine
            result["throughput"] += got if isinstance(got, list) else [{"engine": label, "error": repr(got)[:300]}]
        print("\nOutput tok/s (Llama-3-8B shape, random weights):")
        for wname in ("fixed", "chat"):
            base = next((r for r in result["throughput"] if r.get("workload") == wname and r["engine"] == "bf16"), None)
            for r in result["throughput"]:
                if base and r.get("workload") == wname:
                    r["vs_bf16"] = r["output_tok_s"] / base["output_tok_s"]
                    print(f"  {wname:<6} {r['engine']:<16}{r['output_tok_s']:>9.0f} tok/s  {r['vs_bf16']:.2f}x bf16")
        blocks = {r["engine"]: r.get("kv_blocks") for r in result["throughput"] if r.get("workload") == "fixed"}
        if blocks.get("fp8") and blocks.get("fp8 + fp8 KV"):
            result["kv_tokens_ratio"] = blocks["fp8 + fp8 KV"] / blocks["fp8"]
            print(f"  KV pool at 0.9 utilization, FP8 weights: {blocks['fp8']} blocks with a bf16 pool, "
                  f"{blocks['fp8 + fp8 KV']} with an fp8 pool ({result['kv_tokens_ratio']:.2f}x the tokens)")
    return finish(result, failures, start, args.json or os.path.join(BENCH, "results",
                                                                      f"fp8_where_{result['date']}.json"))


def finish(result: dict, failures: list, start: float, path: str) -> int:
    """Record the failures and the wall time, write the JSON, print the failures; the exit status."""
    result["failures"] = failures
    result["seconds"] = round(time.time() - start, 1)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\n{len(failures)} check failure(s); {result['seconds']} s; wrote {path}")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
