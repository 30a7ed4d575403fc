"""Where the FP8 decode step's device memsets come from (one H200, Llama-3-8B shapes): first a decoder layer's launches
(attention left out) as the engine makes them, FP8 and bf16, at 256 and 8,192 rows, in one CUDA graph of 8 layers (µs
per layer, and one replay profiled: device µs per kernel and memsets per layer); then each FP8 launch of a decoder
layer, called as the engine calls it (256 rows: the GEMMs tensor-wise with unit scales, their scales deferred; 8,192
rows: row-wise with fast accumulation), run eagerly under torch.profiler, its device activities counted per call
(memsets by name); then, in a fresh process, cuBLASLt's own candidate algorithms for each decode GEMM
(kernels/fp8_cublaslt.py), each checked against float64 and timed against torch._scaled_mm's pick; then the GEMMs
again in a fresh process with no cuBLASLt workspace (CUBLASLT_WORKSPACE_SIZE=0, read once per process), each GEMM's
memsets and µs per call in a CUDA graph. Called by
bench/fp8_step.py (--sections memsets); alone:

    python bench/fp8_memset.py              # both parts, a table
    python bench/fp8_memset.py --gemms-only # the GEMM part in this process, one JSON line (the subprocess probe)
    python bench/fp8_memset.py --lt-only    # the cuBLASLt candidates in this process, one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))

DEV = torch.device("cuda")
H, I, QKV_N = 4096, 14336, 6144
GEMMS = {"qkv": (QKV_N, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}
"""name -> (N, K) of the Llama-3-8B linear layers."""
WORKSPACES_KIB: tuple = ()
"""CUBLASLT_WORKSPACE_SIZE values (KiB) probed in fresh processes besides this process's default (none by default:
the cuBLASLt probe counts each candidate's memsets; run(("0",)) for the no-workspace case)."""


def device_activity(fn, calls: int = 4) -> dict:
    """fn run `calls` times eagerly under torch.profiler (after one call outside it): device activities per call by
    name (kernels, memsets, copies)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    names: Counter = Counter()
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.count and not ev.key.startswith(("cuda", "Activity")):
            names[ev.key] += ev.count
    return {k: v / calls for k, v in names.items()}


def memsets_of(activity: dict) -> float:
    return sum(v for k, v in activity.items() if "memset" in k.lower())


def graph_us(fn, copies: int = 8, reps: int = 5) -> float:
    """µs per call of one CUDA graph of `copies` calls (bench/quant.py's graph_ms)."""
    import quant as qb
    return 1e3 * qb.graph_ms([fn] * copies, reps)


def gemm_ops(ms=(256, 8192)) -> dict:
    """label -> a call of torch._scaled_mm as fp8.py's FP8Method makes it at that row count."""
    from services.engine.model.quantization import fp8 as fp8mod

    g = torch.Generator(device=DEV).manual_seed(5)
    unit = torch.ones((), device=DEV)
    ops = {}
    for m in ms:
        for name, (n, k) in GEMMS.items():
            w = (torch.randn(n, k, generator=g, device=DEV) * 0.02).to(torch.float8_e4m3fn)
            xq = (torch.randn(m, k, generator=g, device=DEV) * 20).to(torch.float8_e4m3fn)
            xs = torch.rand(m, 1, generator=g, device=DEV) * 0.01 + 1e-3
            ws = torch.rand(1, n, generator=g, device=DEV) * 1e-3 + 1e-4
            if m <= fp8mod.DEFER_MAX_M.get((n, k), m):  # deferred scales: tensor-wise, unit scales (decode)
                ops[f"{name} M={m} tensor-wise"] = lambda xq=xq, w=w: torch._scaled_mm(
                    xq, w.t(), scale_a=unit, scale_b=unit, out_dtype=torch.bfloat16)
                ops[f"{name} M={m} swapped"] = lambda xq=xq, w=w: torch._scaled_mm(
                    w, xq.t(), scale_a=unit, scale_b=unit, out_dtype=torch.bfloat16)
                halves = w.chunk(2)
                ops[f"{name} M={m} N in 2"] = lambda xq=xq, halves=halves: [torch._scaled_mm(
                    xq, h.t(), scale_a=unit, scale_b=unit, out_dtype=torch.bfloat16) for h in halves]
            ops[f"{name} M={m} row-wise"] = lambda xq=xq, w=w, xs=xs, ws=ws: torch._scaled_mm(
                xq, w.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16, **fp8mod._fast_accum(xq))
    return ops


def producer_ops(m: int = 256) -> dict:
    """label -> a call of each of FP8's own launches in a decode layer at m rows, as the engine makes it."""
    from kernels import fp8_fused, fp8_quant
    from kernels import rotary as rk

    g = torch.Generator(device=DEV).manual_seed(6)
    bf = torch.bfloat16
    x = torch.randn(m, H, generator=g, device=DEV).to(bf)
    res = torch.randn(m, H, generator=g, device=DEV).to(bf)
    nw = torch.rand(H, generator=g, device=DEV).to(bf) + 0.5
    sc = (torch.rand(m, 1, generator=g, device=DEV) * 0.01, torch.rand(1, H, generator=g, device=DEV) * 0.01)
    gu = (torch.randn(m, 2 * I, generator=g, device=DEV) * 40).to(bf)
    gsc = (torch.rand(m, 1, generator=g, device=DEV) * 0.01, torch.rand(1, 2 * I, generator=g, device=DEV) * 0.01)
    qkv = (torch.randn(m, QKV_N, generator=g, device=DEV) * 40).to(bf)
    qsc = (torch.rand(m, 1, generator=g, device=DEV) * 0.01, torch.rand(1, QKV_N, generator=g, device=DEV) * 0.01)
    ang = torch.rand(m, 64, generator=g, device=DEV) * 6
    cos, sin = ang.cos(), ang.sin()
    cache = torch.zeros(2, m // 16 + 4, 16, 8, 128, device=DEV, dtype=bf)
    slots = torch.randperm(cache.shape[1] * 16, generator=g, device=DEV)[:m]
    head = torch.randn(128256, H, generator=g, device=DEV).to(bf) * 0.02
    w_gu = torch.randn(2 * I, H, generator=g, device=DEV).to(bf) * 0.02
    return {
        "add + RMSNorm + FP8 (first layer)": lambda: fp8_fused.add_rms_norm_fp8(x, None, nw, 1e-5),
        "add + RMSNorm + FP8 (scales applied)": lambda: fp8_fused.add_rms_norm_fp8(x, res, nw, 1e-5, x_scales=sc),
        "SwiGLU + FP8 (scales applied)": lambda: fp8_fused.silu_mul_fp8(gu, scales=gsc),
        "quantize o's input": lambda: fp8_quant.quantize_fp8_rows(x),
        "rotary + cache (q/k/v scales)": lambda: rk.rotary_and_cache(
            *qkv.split([4096, 1024, 1024], -1), cos, sin, cache, slots, 128, scales=qsc),
        "bf16 LM head (both engines)": lambda: torch.nn.functional.linear(x, head),
        "bf16 gate_up (the bf16 engine's)": lambda: torch.nn.functional.linear(x, w_gu),
    }


class Layer:
    """One decoder layer's weights and buffers at m rows (attention left out: both engines run the same one)."""

    def __init__(self, m: int, g: torch.Generator, fp8: bool):
        bf = torch.bfloat16
        self.m, self.fp8 = m, fp8
        wt = (lambda n, k: (torch.randn(n, k, generator=g, device=DEV) * 0.02).to(torch.float8_e4m3fn)) if fp8 \
            else (lambda n, k: (torch.randn(n, k, generator=g, device=DEV) * 0.02).to(bf))
        self.w = {name: wt(n, k) for name, (n, k) in GEMMS.items()}
        self.col = {name: torch.rand(1, n, generator=g, device=DEV) * 1e-3 + 1e-4 for name, (n, k) in GEMMS.items()}
        self.nw = torch.rand(H, generator=g, device=DEV).to(bf) + 0.5
        self.attn = torch.randn(m, H, generator=g, device=DEV).to(bf)
        ang = torch.rand(m, 64, generator=g, device=DEV) * 6
        self.cos, self.sin = ang.cos(), ang.sin()
        self.cache = torch.zeros(2, m // 16 + 4, 16, 8, 128, device=DEV, dtype=bf)
        self.slots = torch.randperm(self.cache.shape[1] * 16, generator=g, device=DEV)[:m]


def layer_chain(layers: list, m: int, fp8: bool):
    """A callable running the layers' launches in order as the engine does at m rows (FP8: fp8.py's deferred scales
    up to DEFER_MAX_M, else row-wise GEMMs, fast accumulation from FAST_ACCUM_MIN_M; bf16: F.linear and the
    16-bit kernels), the residual stream carried from layer to layer."""
    import torch.nn.functional as F

    from kernels import fp8_fused, fp8_quant, fused_norm, silu_mul
    from kernels import rotary as rk
    from services.engine.model.quantization import fp8 as fp8mod

    g = torch.Generator(device=DEV).manual_seed(8)
    h0 = torch.randn(m, H, generator=g, device=DEV).to(torch.bfloat16)
    residual = torch.randn(m, H, generator=g, device=DEV).to(torch.bfloat16)
    unit = torch.ones((), device=DEV)

    def mm(xq, xs, lay, name):  # FP8Method._quantized's choice: (raw, scales) or (scaled, None)
        w = lay.w[name]
        if m <= fp8mod.DEFER_MAX_M.get(tuple(w.shape), m):
            return torch._scaled_mm(xq, w.t(), scale_a=unit, scale_b=unit, out_dtype=torch.bfloat16), (xs, lay.col[name])
        return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=lay.col[name], out_dtype=torch.bfloat16,
                                **fp8mod._fast_accum(xq)), None

    def run_fp8():
        h, sc = h0, None
        for lay in layers:
            xq, xs = fp8_fused.add_rms_norm_fp8(h, residual, lay.nw, 1e-5, x_scales=sc)
            qkv, qs = mm(xq, xs, lay, "qkv")
            q, k, v = qkv.split([4096, 1024, 1024], -1)
            if not rk.rotary_and_cache(q, k, v, lay.cos, lay.sin, lay.cache, lay.slots, 128, scales=qs):
                raise RuntimeError("rotary_and_cache did not run")
            oq, os_ = fp8_quant.quantize_fp8_rows(lay.attn)
            o, osc = mm(oq, os_, lay, "o")
            xq, xs = fp8_fused.add_rms_norm_fp8(o, residual, lay.nw, 1e-5, x_scales=osc)
            gu, gsc = mm(xq, xs, lay, "gate_up")
            sq, ss = fp8_fused.silu_mul_fp8(gu, scales=gsc)
            h, sc = mm(sq, ss, lay, "down")
        return h

    def run_bf16():
        h = h0
        for lay in layers:
            x = fused_norm.add_rms_norm(h, residual, lay.nw, 1e-5)
            q, k, v = F.linear(x, lay.w["qkv"]).split([4096, 1024, 1024], -1)
            rk.rotary_and_cache(q, k, v, lay.cos, lay.sin, lay.cache, lay.slots, 128)
            o = F.linear(lay.attn, lay.w["o"])
            x = fused_norm.add_rms_norm(o, residual, lay.nw, 1e-5)
            h = F.linear(silu_mul.silu_mul(F.linear(x, lay.w["gate_up"])), lay.w["down"])
        return h

    return run_fp8 if fp8 else run_bf16


def chain_section(ms=((256, 8), (8192, 1))) -> dict:
    """Per layer at each (rows, distinct weight sets): the FP8 and bf16 chains (layer_chain) as one CUDA graph of 8
    layers, µs per layer; then one replay under torch.profiler: device µs per layer by kernel, memsets per layer."""
    from torch.profiler import ProfilerActivity, profile

    import quant as qb

    out = {}
    for m, sets in ms:
        for fp8 in (False, True):
            label = f"{'fp8' if fp8 else 'bf16'} M={m}"
            try:
                g = torch.Generator(device=DEV).manual_seed(7)
                layers = [Layer(m, g, fp8) for _ in range(sets)]
                layers = (layers * (8 // sets))[:8]
                fn = layer_chain(layers, m, fp8)
                us = 1e3 * qb.graph_ms([fn], reps=5) / len(layers)
                stream = torch.cuda.Stream()
                graph = torch.cuda.CUDAGraph()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.graph(graph, stream=stream):
                    fn()
                graph.replay()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    graph.replay()
                    torch.cuda.synchronize()
                kern = {}
                for ev in prof.key_averages():
                    t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                    if t and ev.count and not ev.key.startswith(("cuda", "Activity")):
                        kern[ev.key] = {"us": t / len(layers), "calls": ev.count / len(layers)}
                del graph
                row = {"us_per_layer": us, "kernels": kern,
                       "memsets_per_layer": sum(v["calls"] for k, v in kern.items() if "memset" in k.lower()),
                       "device_us_per_layer": sum(v["us"] for v in kern.values())}
            except Exception as e:
                row = {"error": repr(e)[:300]}
            out[label] = row
            if "error" in row:
                print(f"chain {label}: ERROR {row['error']}", flush=True)
                continue
            print(f"chain {label}: {us:.1f} us per layer in a graph of 8 (device {row['device_us_per_layer']:.1f}); "
                  f"memsets {row['memsets_per_layer']:g} per layer", flush=True)
            for k, v in sorted(kern.items(), key=lambda kv: -kv[1]["us"]):
                print(f"    {v['us']:8.1f} us {v['calls']:4g}x  {k[:110]}", flush=True)
            del layers, fn
            torch.cuda.empty_cache()
    return out


def probe(ops: dict, time_them: bool) -> dict:
    """label -> {memsets per call, activities per call, µs per call in a graph (time_them)}."""
    out = {}
    for label, fn in ops.items():
        try:
            act = device_activity(fn)
            row = {"memsets": memsets_of(act), "activity": act}
            if time_them:
                row["us"] = graph_us(fn)
        except Exception as e:  # a launch that fails here is reported, not fatal
            row = {"error": repr(e)[:300]}
        out[label] = row
    return out


LT_CASES = ((256, "unit"), (8192, "row fast"))
"""(rows, kind) the cuBLASLt probe measures: decode's deferred-scale GEMMs, prefill's row-wise ones with fast
accumulation (FAST_ACCUM_MIN_M)."""


def lt_probe(cases=LT_CASES, count: int = 32, profile_best: int = 2) -> dict:
    """cuBLASLt's own candidates for each Llama-3-8B GEMM at each (rows, kind) of `cases` (kernels/fp8_cublaslt.py, bf16
    out), in the heuristic's order: each checked against the float64 product (its largest error at most twice
    torch._scaled_mm's, plus 1e-6 of the largest output), then µs per call in a CUDA graph over weight copies that
    overflow L2, against torch._scaled_mm in the same graph form; the fastest few (and the heuristic's first) profiled
    for memsets per call. Returns per "name M kind" the rows and the fastest passing config; a case
    that fails as a whole is reported with its error and the others still run."""
    from kernels import fp8_cublaslt as lt

    g = torch.Generator(device=DEV).manual_seed(11)
    out = {}
    for m, kind in cases:
        for name, (n, k) in GEMMS.items():
            try:
                out[f"{name} {m} {kind}"] = _lt_case(name, m, n, k, kind, g, count, profile_best)
            except Exception as e:
                out[f"{name} {m} {kind} error"] = repr(e)[:300]
            torch.cuda.empty_cache()
    out["library"] = str(lt.lib()._name)  # loaded after torch's first FP8 GEMM: the copy torch uses
    return out


def _lt_case(name, m, n, k, kind, g, count, profile_best) -> dict:
    import quant as qb

    from kernels import fp8_cublaslt as lt

    unit = torch.ones((), device=DEV)
    copies = qb.copies_for(n * k)
    ws = [(torch.randn(n, k, generator=g, device=DEV) * 0.02).to(torch.float8_e4m3fn) for _ in range(copies)]
    xq = (torch.randn(m, k, generator=g, device=DEV) * 20).to(torch.float8_e4m3fn)
    if kind == "unit":
        xs, wsc = unit, unit
        ref64 = xq.double() @ ws[0].double().t()
    else:
        xs = torch.rand(m, 1, generator=g, device=DEV) * 0.01 + 1e-3
        wsc = torch.rand(1, n, generator=g, device=DEV) * 1e-3 + 1e-4
        ref64 = (xq.double() @ ws[0].double().t()) * xs.double() * wsc.double()
    fast = {"use_fast_accum": True} if kind == "row fast" else {}

    def torch_mm(w):
        return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=wsc, out_dtype=torch.bfloat16, **fast)

    top = ref64.abs().max().item()
    torch_err = (torch_mm(ws[0]).double() - ref64).abs().max().item()
    bound = 2 * torch_err + 1e-6 * top
    t_torch = 1e3 * qb.graph_ms([lambda w=w: torch_mm(w) for w in ws])
    row_scales = {} if kind == "unit" else {"xs": xs, "ws": wsc}
    plan = lt.Plan(m, n, k, DEV, kind)
    plan.set_scales(row_scales.get("xs"), row_scales.get("ws"))
    cands = plan.candidates(count)
    rows = []
    for i, c in enumerate(cands):
        row = {"rank": i, "config": c["config"], "workspace": c["workspace"], "waves": round(c["waves"], 3)}
        try:
            y = plan.run(xq, ws[0], algo=c["algo"], **row_scales)
            err = (y.double() - ref64).abs().max().item()
            row.update(err=err / top, ok=bool(err <= bound and bool(torch.isfinite(y).all())))
            if row["ok"]:
                row["us"] = 1e3 * qb.graph_ms([lambda w=w, a=c["algo"]: plan.run(xq, w, algo=a, **row_scales)
                                               for w in ws])
        except Exception as e:  # an algorithm that does not launch is reported, not used
            row.update(ok=False, error=repr(e)[:200])
        rows.append(row)
    timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    for r in timed[:profile_best] + [r for r in rows[:1] if "us" in r and "memsets" not in r]:
        a = cands[r["rank"]]["algo"]
        r["memsets"] = memsets_of(device_activity(lambda a=a: plan.run(xq, ws[0], algo=a, **row_scales)))
    return {"name": name, "M": m, "N": n, "K": k, "kind": kind, "torch_us": t_torch, "torch_err": torch_err / top,
            "torch_memsets": memsets_of(device_activity(lambda: torch_mm(ws[0]))),
            "rows": rows, "best": timed[0] if timed else None, "failed": sum(1 for r in rows if not r.get("ok"))}


def _cases(got: dict) -> list[dict]:
    return [v for v in got.values() if isinstance(v, dict) and "torch_us" in v] if isinstance(got, dict) else []


def print_lt(got: dict) -> None:
    if "error" in got:
        print(f"cuBLASLt probe: ERROR {got['error']}", flush=True)
        return
    print(f"cuBLASLt candidates ({got.get('library')}; {got.get('seconds')} s):", flush=True)
    for key, err in got.items():
        if key.endswith(" error"):
            print(f"  {key}: {err}", flush=True)
    for r in _cases(got):
        b = r["best"]
        print(f"  {r['name']:<8} M={r['M']:<5} {r['kind']:<9} torch._scaled_mm {r['torch_us']:7.1f} us (memsets "
              f"{r['torch_memsets']:g}); {len(r['rows'])} candidates, {r['failed']} failed the check; best "
              + (f"{b['us']:7.1f} us rank {b['rank']} {b['config']} ws {b['workspace']}" if b else "none"), flush=True)
        for row in sorted((x for x in r["rows"] if "us" in x), key=lambda x: x["us"])[:5]:
            print(f"      rank {row['rank']:>2} {row['us']:7.1f} us err {row['err']:.1e} memsets "
                  f"{row.get('memsets', '?')} {row['config']}", flush=True)
        bad = [x for x in r["rows"] if not x.get("ok")]
        for row in bad[:3]:
            print(f"      FAILED rank {row['rank']}: err {row.get('err')} {row.get('error', '')} {row['config']}",
                  flush=True)
    print(f"  3% or more faster than torch._scaled_mm: {faster(got)}", flush=True)


def faster(got: dict, margin: float = 0.97) -> dict:
    """(M, N, K, kind) -> the fastest checked config of lt_probe's result where it beat torch._scaled_mm by `margin` or
    more."""
    out = {}
    for r in _cases(got):
        if r.get("best") and r["best"]["us"] < margin * r["torch_us"]:
            out[(r["M"], r["N"], r["K"], r["kind"])] = r["best"]["config"]
    return out


def lt_probe_in(timeout: float = 90.0) -> dict:
    """lt_probe in a fresh process (a wrong call into the library must not take this one down)."""
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--lt-only"], capture_output=True, text=True,
                           timeout=timeout)
        line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("{")), None)
        got = json.loads(line) if line else {"error": f"rc {p.returncode}: " + (p.stderr or p.stdout)[-600:]}
    except Exception as e:
        got = {"error": repr(e)[:300]}
    got["seconds"] = round(time.time() - t0, 1)
    return got


def gemm_probe_in(env_kib: str | None, timeout: float = 60.0) -> dict:
    """The GEMM probe in a fresh process with CUBLASLT_WORKSPACE_SIZE=env_kib (None: unset)."""
    env = dict(os.environ)
    if env_kib is None:
        env.pop("CUBLASLT_WORKSPACE_SIZE", None)
    else:
        env["CUBLASLT_WORKSPACE_SIZE"] = env_kib
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--gemms-only"], env=env, capture_output=True,
                           text=True, timeout=timeout)
        line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("{")), None)
        got = json.loads(line) if line else {"error": (p.stderr or p.stdout)[-400:]}
    except Exception as e:
        got = {"error": repr(e)[:300]}
    got["seconds"] = round(time.time() - t0, 1)
    return got


def short(act: dict) -> str:
    return "; ".join(f"{k[:60]} x{v:g}" for k, v in sorted(act.items(), key=lambda kv: -kv[1]))


def print_rows(title: str, rows: dict) -> None:
    print(title, flush=True)
    for label, r in rows.items():
        if "error" in r:
            print(f"  {label:<40} ERROR {r['error']}", flush=True)
            continue
        us = f"{r['us']:7.1f} us" if "us" in r else ""
        print(f"  {label:<40} memsets {r['memsets']:g}/call {us}  [{short(r['activity'])[:220]}]", flush=True)


def run(workspaces=WORKSPACES_KIB) -> dict:
    """Both parts (in this process, then the GEMMs per workspace size in fresh processes); prints tables."""
    out = {"chain": chain_section(), "producers": probe(producer_ops(), time_them=False),
           "gemms_default": probe(gemm_ops(), time_them=True)}
    print_rows("FP8 decode launches at 256 rows, device activity per call (this process):", out["producers"])
    print_rows(f"FP8 GEMMs, this process (CUBLASLT_WORKSPACE_SIZE={os.environ.get('CUBLASLT_WORKSPACE_SIZE')}):",
               out["gemms_default"])
    out["cublaslt"] = lt_probe_in()
    print_lt(out["cublaslt"])
    for kib in workspaces:
        got = gemm_probe_in(kib)
        out[f"gemms_ws{kib}"] = got
        if "error" in got and "rows" not in got:
            print(f"FP8 GEMMs with CUBLASLT_WORKSPACE_SIZE={kib}: ERROR {got['error']}", flush=True)
        else:
            print_rows(f"FP8 GEMMs with CUBLASLT_WORKSPACE_SIZE={kib} (fresh process, {got['seconds']} s):",
                       got["rows"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gemms-only", action="store_true", help="the GEMM part here, one JSON line")
    ap.add_argument("--lt-only", action="store_true", help="the cuBLASLt candidates here, one JSON line")
    args = ap.parse_args()
    sys.path.append(BENCH)  # after the repository: bench/kernels.py must not shadow the kernels package
    if args.lt_only:
        print(json.dumps(lt_probe(), default=str))
        return 0
    if args.gemms_only:
        print(json.dumps({"rows": probe(gemm_ops(), time_them=True)}))
        return 0
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
