"""The batch-1 W4A16 layer tail in one persistent launch (kernels/w4a16_mlp.py: the MLP alone, or o_proj + residual
add + RMSNorm + MLP, and the next layer's input norm + qkv) against today's launches, Llama-3-8B shapes (hidden 4096,
q 4096, inter 14336, group 128, bf16) on one GPU: checks, kernel timing until --timing-until, then the engine
(bench/w4a16.py's engine runs) to --budget; --engines-first swaps the last two, --no-checks skips the first.

    timeout 88 python bench/w4a16_mlp.py [--json PATH] [--timing-until 32] [--budget 78]
        [--engines w4a16+post+front+prof w4a16 w4a16+post] [--engines-first] [--no-checks] [--configs 0 9 ...]

1. checks (exit 1 on a failure; each check on its own, so one failing does not stop the rest): both kernels in one
   launch (grid barriers) and a launch per phase against float32 x @ dequant(w) with each intermediate rounded as
   the unfused layer stores it, PDL 0 / 2, act-order with group 32 on an odd shape, a CUDA graph of 4 chained layer
   tails replayed with new inputs (the barrier's generation counter needs no reset), the barrier's error word (a
   program that gave up waiting: the grid was not resident) and the split-K workspace left zeroed.
2. timing, one CUDA graph of 32 layers each (3.6 GB of 4-bit weights, read from HBM): the MLP (current: gate/up
   with SwiGLU epilogue + down; persistent over a grid of configs), the post-attention tail (current: o GEMV,
   add + RMSNorm kernel, MLP; persistent), the tail with the next layer's input norm and qkv (a layer without its
   attention and rotary), µs per layer and the weights' effective read rate; a read-only kernel over
   the same bytes (the ceiling).
3. engine (--engines, tags as bench/w4a16.py: +post = int4.FUSE_POST, +front = FUSE_FRONT, +mlp = FUSE_MLP, +prof):
   batch-1 decode ms/token, greedy tokens against the first run, the barrier error word after each run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quant as q  # noqa: E402
from kernels import pdl as pdl_mod  # noqa: E402
from kernels import splitk  # noqa: E402
from kernels import w4a16 as w4  # noqa: E402
from kernels import w4a16_mlp as wm  # noqa: E402
from kernels.fused_norm import add_rms_norm  # noqa: E402

DEV, DTYPE = q.DEV, q.DTYPE
HIDDEN, QDIM, INTER, GROUP, LAYERS, NQKV = 4096, 4096, 14336, 128, 32, 6144
EPS = 1e-5

BASE = dict(T_Q=8, BN_Q=256, T_O=8, BN_O=256, T_A=8, BN_A=256, T_B=8, BN_B=256, num_warps=2, PER_SM=0, H2=2, L2=0,
            DEPTH=1)
"""Round 2's fastest (2 warps, 8 x 256 tiles: the most programs per SM measured faster, 2 -> 3 -> 6), with PER_SM 0:
as many as fit."""
W1 = dict(BASE, T_Q=8, BN_Q=128, T_O=8, BN_O=128, BN_A=128, BN_B=128, num_warps=1)
W4 = dict(BASE, BN_Q=512, BN_O=512, BN_A=512, BN_B=512, num_warps=4)
CONFIGS = [BASE, dict(BASE, DEPTH=2), W1, dict(W1, DEPTH=2), W4, dict(BASE, T_A=16, T_B=16, T_O=16, T_Q=16),
           dict(BASE, L2=4), dict(BASE, maxnreg=96), dict(BASE, maxnreg=80),
           dict(BASE, DEPTH=0, STAGES=3, L2=2), dict(BASE, DEPTH=0, STAGES=4, L2=2), dict(W4, DEPTH=0, STAGES=3, L2=2)]
"""Indices 9-11: the loads through Triton's software pipeline (cp.async into shared memory, `DEPTH` 0)."""


def weights(k, n, group, g, act_order=False, scale=0.01):
    """Random 4-bit weights (any int32 bits are valid nibbles), scales ~U(0, scale), zero points 0..15."""
    rows = w4.block_rows(k)
    qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (-(-k // rows) * rows // 8, n), generator=g, device=DEV,
                       dtype=torch.int32)
    s = (torch.rand(-(-k // group), n, generator=g, device=DEV) * scale).to(DTYPE)
    z = torch.randint(0, 16, s.shape, generator=g, device=DEV, dtype=torch.int32).to(torch.uint8)
    perm = torch.randperm(k, generator=g, device=DEV).to(torch.int32) if act_order else None
    return qw, s, z, group, perm


def layer(g, hidden=HIDDEN, qdim=QDIM, inter=INTER, group=GROUP, act_order=False, nqkv=NQKV):
    """(o, gate_up, down, post-attention norm weight, qkv, input norm weight): scales picked so activations stay O(1)
    through the chain."""
    return (weights(qdim, hidden, group, g, act_order, 0.004), weights(hidden, 2 * inter, group, g, act_order, 0.01),
            weights(inter, hidden, group, g, act_order, 0.002),
            (1 + 0.1 * torch.randn(hidden, generator=g, device=DEV)).to(DTYPE),
            weights(hidden, nqkv, group, g, act_order, 0.004),
            (1 + 0.1 * torch.randn(hidden, generator=g, device=DEV)).to(DTYPE))


def lin_ref(x, w):
    xs = x.float()[:, w[4].long()] if w[4] is not None else x.float()
    return xs @ w4.dequantize_int4(w[0], w[1], w[2], w[3], x.shape[1])


def mlp_ref(x, a, b):
    """float32 x @ dequant(gate/up) rounded to x's dtype, silu(gate) * up rounded as kernels/silu_mul.py, @ down."""
    gu = lin_ref(x, a).to(x.dtype).float()
    gate, up = gu[:, :gu.shape[1] // 2], gu[:, gu.shape[1] // 2:]
    act = (torch.nn.functional.silu(gate).to(x.dtype).float() * up).to(x.dtype)
    return lin_ref(act, b)


def add_norm_ref(y, residual, nw):
    """(Llama RMSNorm of y + residual, y + residual), rounded as kernels/fused_norm.py rounds."""
    h = (y.to(residual.dtype).float() + residual.float()).to(residual.dtype)
    hf = h.float()
    x = (nw.float() * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(h.dtype).float()).to(h.dtype)
    return x, h


def post_ref(attn, residual, lw, front=False):
    """(MLP output float32, new residual) of o_proj -> add -> Llama RMSNorm -> MLP; front: (the next layer's qkv of
    its input norm, float32; the residual after that add) with lw's qkv and input norm standing in for the next
    layer's."""
    o, a, b, nw = lw[:4]
    x, h = add_norm_ref(lin_ref(attn, o), residual, nw)
    y = mlp_ref(x, a, b)
    if not front:
        return y, h
    x2, h2 = add_norm_ref(y, h, lw[5])
    return lin_ref(x2, lw[4]), h2


def record_check(rows, failures, name, out, ref, tol=5e-2):
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    ws, cnt = splitk.workspace(DEV, 1)
    barrier_err = wm.errors(DEV)
    ok = err < tol and not ws.any().item() and not cnt.any().item() and barrier_err == 0
    row = dict(name=name, rel_err=err, workspace_zero=not ws.any().item(), barrier_error=barrier_err, ok=ok)
    rows.append(row)
    print(f"check {name:<56} rel err {err:.2e}  {'ok' if ok else 'FAILED'}"
          + ("" if barrier_err == 0 else "  (a program gave up at a barrier)"), flush=True)
    if not ok:
        failures.append(row)
    wm.clear_errors(DEV)


def guarded(rows, failures, name, fn):
    """Run one check; an exception is a failed check, and the others still run."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        row = dict(name=name, error=f"{type(e).__name__}: {str(e)[-400:]}", ok=False)
        rows.append(row)
        failures.append(row)
        print(f"check {name:<56} FAILED: {row['error']}", flush=True)
        wm.clear_errors(DEV)


def checks(failures) -> list:
    g = torch.Generator(device=DEV).manual_seed(5)
    rows: list = []
    wm.reserve(DEV, HIDDEN, INTER)
    lw = layer(g)
    o, a, b, nw = lw[:4]
    x = torch.randn(1, HIDDEN, generator=g, device=DEV).to(DTYPE)
    attn = torch.randn(1, QDIM, generator=g, device=DEV).to(DTYPE)
    res = torch.randn(1, HIDDEN, generator=g, device=DEV).to(DTYPE)
    ref = mlp_ref(x, a, b)
    pref, href = post_ref(attn, res, lw)
    t0 = time.time()
    lw2 = layer(g, hidden=1088, qdim=576, inter=2880, group=32, act_order=True, nqkv=576)
    x2 = torch.randn(1, 1088, generator=g, device=DEV).to(DTYPE)
    attn2 = torch.randn(1, 576, generator=g, device=DEV).to(DTYPE)
    res2 = torch.randn(1, 1088, generator=g, device=DEV).to(DTYPE)
    jobs = []  # compile every checked variant at once (threads), not one after another
    for phases, pdl, i in ((1, 2, 0), (1, 2, 1), (2, 2, 0), (1, 0, 2)):
        jobs += [lambda c=CONFIGS[i], p=phases, d=pdl: wm.mlp(x, a, b, c, phases=p, pdl=d, warmup=True),
                 lambda c=CONFIGS[i], p=phases, d=pdl: wm.post_attention(attn, res, o, nw, EPS, a, b, c, phases=p,
                                                                         pdl=d, warmup=True)]
    for phases in (1, 2):
        jobs.append(lambda p=phases: wm.post_attention(attn, res, o, nw, EPS, a, b, BASE, phases=p, pdl=2, warmup=True,
                                                       front=(lw[5], EPS, lw[4])))
        jobs += [lambda p=phases: wm.mlp(x2, lw2[1], lw2[2], BASE, phases=p, pdl=2, warmup=True),
                 lambda p=phases: wm.post_attention(attn2, res2, lw2[0], lw2[3], EPS, lw2[1], lw2[2], BASE, phases=p,
                                                    pdl=2, warmup=True, front=(lw2[5], EPS, lw2[4]))]
    q.precompile(jobs)
    print(f"checks: compiled in {time.time() - t0:.0f} s", flush=True)
    # bf16 through two or three GEMVs, SwiGLU and a norm: a rounding flip early moves later values by 2^-8 relative;
    # the tolerance is 5% of the largest output (a wrong tile, slice or phase is O(1)); the current path's own
    # error against the same reference comes first, for scale
    guarded(rows, failures, "current MLP (gemv3 gated + down)",
            lambda: record_check(rows, failures, "current MLP (gemv3 gated + down)",
                                 w4.w4a16(w4.w4a16(x, *a, gated=True), *b), ref))
    guarded(rows, failures, "current tail", lambda: record_check(
        rows, failures, "current tail (o, add_rms_norm, MLP)",
        w4.w4a16(w4.w4a16(add_rms_norm(w4.w4a16(attn, *o), res.clone(), nw, EPS), *a, gated=True), *b), pref))
    for phases, pdl, i in ((1, 2, 0), (1, 2, 1), (2, 2, 0), (1, 0, 2)):
        cfg = CONFIGS[i]
        name = f"MLP {phases} launch(es) pdl {pdl} cfg #{i}"
        guarded(rows, failures, name, lambda cfg=cfg, name=name, phases=phases, pdl=pdl: record_check(
            rows, failures, name, wm.mlp(x, a, b, cfg, phases=phases, pdl=pdl), ref))

        def post(cfg=cfg, phases=phases, pdl=pdl, i=i):
            r = res.clone()
            out = wm.post_attention(attn, r, o, nw, EPS, a, b, cfg, phases=phases, pdl=pdl)
            record_check(rows, failures, f"post-attention {phases} launch(es) pdl {pdl} cfg #{i}", out, pref)
            record_check(rows, failures, "  its residual", r, href, tol=1e-2)
        guarded(rows, failures, f"post-attention {phases} pdl {pdl} cfg #{i}", post)
    fref, fhref = post_ref(attn, res, lw, front=True)
    for phases in (1, 2):
        def front(phases=phases):
            r = res.clone()
            out = wm.post_attention(attn, r, o, nw, EPS, a, b, BASE, phases=phases, pdl=2, front=(lw[5], EPS, lw[4]))
            record_check(rows, failures, f"tail + next front (qkv), {phases} launch(es)", out, fref)
            record_check(rows, failures, "  its residual", r, fhref, tol=1e-2)
        guarded(rows, failures, f"tail + front {phases}", front)
    # act-order on every GEMV, group 32 (H2 off: the float32 path), odd K (64-row blocks), a half strip past inter
    ref2 = mlp_ref(x2, lw2[1], lw2[2])
    pref2, _ = post_ref(attn2, res2, lw2, front=True)
    for phases in (1, 2):
        guarded(rows, failures, f"act-order MLP {phases}", lambda phases=phases: record_check(
            rows, failures, f"act-order g32 1088/2880 MLP, {phases} launch(es)",
            wm.mlp(x2, lw2[1], lw2[2], BASE, phases=phases, pdl=2), ref2))
        guarded(rows, failures, f"act-order post {phases}", lambda phases=phases: record_check(
            rows, failures, f"act-order g32 576/1088/2880 post-attention + front, {phases} launch(es)",
            wm.post_attention(attn2, res2.clone(), lw2[0], lw2[3], EPS, lw2[1], lw2[2], BASE, phases=phases, pdl=2,
                              front=(lw2[5], EPS, lw2[4])), pref2))

    def graph_check():
        """Each layer checked on the inputs the graph gave it (its outputs and residuals kept), so rounding does not
        compound over the chain."""
        layers = [layer(g) for _ in range(4)]
        ain = torch.zeros(1, QDIM, device=DEV, dtype=DTYPE)
        rin = torch.zeros(1, HIDDEN, device=DEV, dtype=DTYPE)

        def chain():
            h, kept = ain, []
            for lw_ in layers:  # each layer's attention input is the previous layer's output (shapes match: q = hidden)
                h = wm.post_attention(h, rin, lw_[0], lw_[3], EPS, lw_[1], lw_[2], BASE, phases=1, pdl=2)
                kept.append((h, rin.clone()))
            return kept

        chain()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            kept = chain()
        r0 = torch.empty_like(rin)
        for rep in range(3):
            ain.copy_(torch.randn(1, QDIM, generator=g, device=DEV).to(DTYPE))
            rin.copy_((0.5 * torch.randn(1, HIDDEN, generator=g, device=DEV)).to(DTYPE))
            r0.copy_(rin)
            graph.replay()
            h, r = ain, r0
            for i, lw_ in enumerate(layers):
                want, want_r = post_ref(h, r, lw_)
                record_check(rows, failures, f"graph of 4 chained tails, replay {rep}, layer {i}", kept[i][0], want)
                record_check(rows, failures, "  its residual", kept[i][1], want_r, tol=1e-2)
                h, r = kept[i]
        del graph

    guarded(rows, failures, "graph", graph_check)
    return rows


def timing(start, budget, failures) -> dict:
    g = torch.Generator(device=DEV).manual_seed(7)
    layers = [layer(g) for _ in range(LAYERS)]
    nbytes = lambda ws: sum(t.numel() * t.element_size() for w in ws for t in w[:3])  # noqa: E731
    mlp_bytes, post_bytes = nbytes(layers[0][1:3]), nbytes(layers[0][:3])
    layer_bytes = post_bytes + nbytes([layers[0][4]])
    x0 = torch.randn(1, HIDDEN, generator=g, device=DEV).to(DTYPE)
    res = torch.randn(1, HIDDEN, generator=g, device=DEV).to(DTYPE)
    out: dict = {"mlp_bytes_per_layer": mlp_bytes, "post_bytes_per_layer": post_bytes,
                 "layer_bytes_per_layer": layer_bytes, "runs": []}

    def record(name, fn, nb, cfg=None):
        if time.time() - start > budget:
            print(f"time {name}: skipped (time budget)", flush=True)
            return None
        ms = q.attempt(lambda: q.graph_ms([fn]))
        if not isinstance(ms, float):
            out["runs"].append(dict(name=name, config=cfg, error=repr(ms)))
            return None
        us = ms * 1e3 / LAYERS
        row = dict(name=name, config=cfg, us_per_layer=us, gb_s=nb / us / 1e3, ms_32_layers=ms)
        out["runs"].append(row)
        print(f"time {name:<60} {us:7.2f} us/layer {row['gb_s']:6.0f} GB/s", flush=True)
        return row

    def cur_mlp():
        h = x0
        for lw in layers:
            h = w4.w4a16(w4.w4a16(h, *lw[1], gated=True), *lw[2])
        return h

    def cur_post(front=False):
        def run():
            h = x0
            for o, a, b, nw, qkv, nw2 in layers:
                xn = add_rms_norm(w4.w4a16(h, *o), res, nw, EPS)
                h = w4.w4a16(w4.w4a16(xn, *a, gated=True), *b)
                if front:  # the next layer's input norm and qkv (its attention and rotary left out)
                    h = w4.w4a16(add_rms_norm(h, res, nw2, EPS), *qkv)[:, :HIDDEN]
            return h
        return run

    def new_mlp(cfg, phases=1):
        def run():
            h = x0
            for lw in layers:
                h = wm.mlp(h, lw[1], lw[2], cfg, phases=phases, pdl=2)
            return h
        return run

    def new_post(cfg, phases=1, front=False):
        def run():
            h = x0
            for o, a, b, nw, qkv, nw2 in layers:
                h = wm.post_attention(h, res, o, nw, EPS, a, b, cfg, phases=phases, pdl=2,
                                      front=(nw2, EPS, qkv) if front else None)
                h = h[:, :HIDDEN] if front else h
            return h
        return run

    pdl_mod.ENABLED = True
    t0 = time.time()
    q.precompile([lambda c=c: wm.mlp(x0, *layers[0][1:3], c, phases=1, pdl=2, warmup=True) for c in CONFIGS]
                 + [lambda c=c: wm.post_attention(x0, res, layers[0][0], layers[0][3], EPS, *layers[0][1:3], c,
                                                  phases=1, pdl=2, warmup=True) for c in CONFIGS]
                 + [lambda c=c: wm.post_attention(x0, res, layers[0][0], layers[0][3], EPS, *layers[0][1:3], c,
                                                  phases=1, pdl=2, warmup=True, front=(layers[0][5], EPS, layers[0][4]))
                    for c in CONFIGS])
    print(f"compiled {2 * len(CONFIGS)} kernels in {time.time() - t0:.0f} s", flush=True)
    cur = record("current MLP: gemv3 gate/up (SwiGLU epilogue) + down, PDL", cur_mlp, mlp_bytes)
    best = None
    lw0 = layers[0]
    mref = mlp_ref(x0, lw0[1], lw0[2])
    res0 = res.clone()  # the timed chains update res in place; the checks start from this copy
    tref, _ = post_ref(x0, res0, lw0)

    def right(cfg, tail):
        """One call of the variant against float32 before it is timed (a wrong variant is a failure, not a figure)."""
        got = q.attempt(lambda: wm.post_attention(x0, res0.clone(), lw0[0], lw0[3], EPS, lw0[1], lw0[2], cfg, phases=1,
                                                  pdl=2) if tail else wm.mlp(x0, lw0[1], lw0[2], cfg, phases=1, pdl=2))
        if isinstance(got, Exception):
            return False
        ref = tref if tail else mref
        err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
        if err > 5e-2 or wm.errors(DEV):
            failures.append(dict(name=f"timing {'tail' if tail else 'MLP'} config {cfg}", rel_err=err,
                                 barrier_error=wm.errors(DEV)))
            print(f"  {'tail' if tail else 'MLP'} config {cfg}: WRONG (rel err {err:.2e}), not timed", flush=True)
            wm.clear_errors(DEV)
            return False
        return True

    for i, cfg in enumerate(CONFIGS):
        if time.time() - start > budget or not right(cfg, False):
            continue
        row = record(f"MLP persistent #{i} " + " ".join(f"{k}={v}" for k, v in cfg.items()
                                                        if k not in ("H2", "T_O", "BN_O", "T_Q", "BN_Q")),
                     new_mlp(cfg), mlp_bytes, cfg)
        if row and (best is None or row["us_per_layer"] < best["us_per_layer"]):
            best = row
    if wm.errors(DEV):
        failures.append(dict(name="timing: a barrier gave up in a timed MLP graph", barrier_error=wm.errors(DEV)))
        wm.clear_errors(DEV)
    curp = record("current tail: o (gemv4) + add_rms_norm + MLP, PDL", cur_post(), post_bytes)
    bestp = None
    for i, cfg in enumerate(CONFIGS):
        if time.time() - start > budget or not right(cfg, True):
            continue
        row = record(f"tail persistent #{i}", new_post(cfg), post_bytes, cfg)
        if row and (bestp is None or row["us_per_layer"] < bestp["us_per_layer"]):
            bestp = row
    curl = record("current layer w/o attention: tail + add_rms_norm + qkv (gemv3)", cur_post(True), layer_bytes)
    bestl = None
    for i, cfg in enumerate([bestp["config"]] if bestp else []):
        row = record("tail + next front persistent (the best tail config)", new_post(cfg, front=True), layer_bytes,
                     cfg)
        if row and (bestl is None or row["us_per_layer"] < bestl["us_per_layer"]):
            bestl = row
    if bestp:
        record("tail: best as a launch per phase (PDL 2)", new_post(bestp["config"], phases=2), post_bytes,
               bestp["config"])
    if wm.errors(DEV):
        failures.append(dict(name="timing: a barrier gave up in a timed tail graph", barrier_error=wm.errors(DEV)))
    flat = [t for lw in layers for t in (lw[0][0], lw[1][0], lw[2][0], lw[4][0])]
    record("read-only ceiling: the layer's 4-bit words, 4 programs/SM",
           lambda: [q.read_flat(t, 4 * splitk.sm_count(DEV)) for t in flat], layer_bytes)
    out.update(best_mlp=best, best_tail=bestp, best_layer=bestl,
               occupancy={str(dict(k[1])): v for k, v in wm._GRIDS.items()})
    for name, c, b in (("MLP", cur, best), ("tail", curp, bestp), ("tail + front", curl, bestl)):
        if c and b:
            saved = c["us_per_layer"] - b["us_per_layer"]
            print(f"{name}: best persistent {b['us_per_layer']:.2f} us/layer against {c['us_per_layer']:.2f}: "
                  f"{saved:+.2f} us/layer saved, {saved * LAYERS / 1e3:+.3f} ms per token; config {b['config']}",
                  flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--timing-until", type=float, default=32.0,
                    help="seconds from the start: no timing graph starts after this")
    ap.add_argument("--engines", nargs="*", default=["w4a16+post+front+prof", "w4a16", "w4a16+post"])
    ap.add_argument("--budget", type=float, default=78.0, help="seconds from the start the engines may use")
    ap.add_argument("--engines-first", action="store_true",
                    help="the engines right after the checks, before the timing (their figures cannot be cut)")
    ap.add_argument("--no-checks", action="store_true", help="skip section 1 (the timing still checks each variant)")
    ap.add_argument("--configs", nargs="*", type=int, default=None, help="timing: these of CONFIGS only (indices)")
    ap.add_argument("--engines-always", action="store_true",
                    help="run the engines even when the timing shows no one-launch config beating the current one")
    args = ap.parse_args()
    start = time.time()
    failures: list = []
    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(DEV),
              "torch": torch.__version__, "triton": triton.__version__}
    if not args.no_checks:
        result["checks"] = checks(failures)
        print(f"{len(result['checks'])} checks, {len(failures)} failed ({time.time() - start:.0f} s)", flush=True)

    def run_timing():
        if args.configs is not None:  # after the checks, which name CONFIGS by index
            CONFIGS[:] = [CONFIGS[i] for i in args.configs]
        got = q.attempt(lambda: timing(start, args.timing_until, failures))
        result["timing"] = got if not isinstance(got, Exception) else repr(got)
        q.free_gpu()

    if not args.engines_first:
        run_timing()
        best = result["timing"].get("best_layer") if isinstance(result["timing"], dict) else None
        cur = next((r for r in result["timing"].get("runs", []) if r["name"].startswith("current layer")), None) \
            if isinstance(result["timing"], dict) else None
        if args.engines and best and cur and not args.engines_always and best["us_per_layer"] >= cur["us_per_layer"]:
            print(f"engines skipped: the best one-launch layer ({best['us_per_layer']:.1f} us) does not beat the "
                  f"current launches ({cur['us_per_layer']:.1f} us) in the timing above", flush=True)
            args.engines = []
        elif best:
            wm.TUNED[(HIDDEN, INTER)] = {k: v for k, v in best["config"].items()}
            print(f"engines run with the one-launch config {wm.TUNED[(HIDDEN, INTER)]}", flush=True)
    if args.engines:
        import w4a16 as bench_w4  # bench/w4a16.py's engine runs

        got = q.attempt(lambda: bench_w4.engine(start, args.budget, args.engines))
        result["engine"] = got if not isinstance(got, Exception) else repr(got)
        for r in (got.get("decode", []) if isinstance(got, dict) else []):
            if r.get("mlp_barrier_errors"):
                failures.append(dict(name=f"engine {r['weights']}: barrier error", value=r["mlp_barrier_errors"]))
        print(f"engine done at {time.time() - start:.0f} s", flush=True)
        q.free_gpu()
    if args.engines_first:
        run_timing()
    result["failures"] = failures
    result["seconds"] = round(time.time() - start, 1)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"w4a16_mlp_{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\n{len(failures)} failure(s); {result['seconds']} s; wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
