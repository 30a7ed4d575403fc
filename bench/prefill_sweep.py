"""Paged prefill kernel variants against torch SDPA on one GPU, in one run (issue 15's >= 90% of SDPA).

    python bench/prefill_sweep.py [--json bench/results/prefill_sweep_<date>.json] [--quick]

Shapes (32 q / 8 kv heads, d 128, block 16, bf16, cache blocks a random permutation of the pool):
  prefill  8 x 2048 causal, no cached prefix (bench/kernels.py's prefill shape)
  long     1 x 8192 causal, no cached prefix
  chunked  8 x (2048 cached + 512 new): a chunked prefill / prefix-cache extend
Each variant of kernels/paged_prefill.py (a config dict: key source NEW_KV, tiles, warps, stages,
BLOCK_N_PAGED, PACK_GQA, BLOCKWISE, REVERSE, PAIR_TILES, LAZY_RESCALE, SEQ_VEC, maxnreg) is first checked
on a mixed batch (a prompt, extends after cached prefixes, decodes, odd lengths, padding) against the torch
reference and against SDPA on every shape it is timed on, then timed (median of triton.testing.do_bench);
"best" counts only variants that passed every check. The default config is also checked on the mixed batch
in fp16, GQA groups 1 / 2 / 3 and head sizes 64 / 256. SDPA runs on the same K/V laid out contiguously (its
own backend choice for the causal squares; the chunked shape's bottom-right causal mask through torch's
causal_lower_right).
The new tokens' K/V are views of one fused qkv buffer, as the model passes them, and are also written
into the cache by reshape_and_cache, so every key source reads the same values.

Compiling ~25 variants serially takes most of a minute, so worker processes compile them first into
Triton's on-disk cache (--jobs); the timed process then loads them from there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))  # paged_cases.make_batch, shared with the tests

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kernels.paged_prefill import paged_prefill, paged_prefill_ref  # noqa: E402
from kernels.paged_prefill_configs import BASE, select_config, table_configs, table_key  # noqa: E402
from kernels.reshape_and_cache import reshape_and_cache  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16
SHAPES = {  # name: (sequences, cached prefix, new tokens)
    "prefill": (8, 0, 2048),
    "long": (1, 0, 8192),
    "chunked": (8, 2048, 512),
    "short": (32, 0, 512),  # many short prompts: the table's fresh-prompt key below 1024 tokens
    "extend": (4, 2048, 2048),  # long chunks after a cached prefix: the extend key of 1024-4095 tokens
}
TIMED = ("short", "prefill", "long", "chunked", "extend")  # the two short of the target first (the budget)
FOCUS = ("short", "prefill", "long")  # every variant is timed here; the others time only the WIDE variants


def _cfg(new_kv="tma", m=128, n=64, w=8, s=2, pack=True, blockwise=False, reverse=True, lazy=False, maxnreg=128,
         seq_vec=32, n_paged=None, pair=False, qs=False, loop_stages=0, unroll=0, ws=False, overlap=False,
         tail=None, one=0, persist=0, gluon=False, pv_async=False, heavy=False, gws=False, pingpong=False, qbufs=2,
         dyn=False, ahead=False, tstore=False):
    """A full config for paged_prefill (every key set, so the table's BASE never leaks in); the defaults are BASE."""
    return dict(NEW_KV=new_kv, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, PACK_GQA=pack,
                BLOCKWISE=blockwise, REVERSE=reverse, LAZY_RESCALE=lazy, maxnreg=maxnreg, SEQ_VEC=seq_vec,
                BLOCK_N_PAGED=n_paged, PAIR_TILES=pair, Q_SCALED=qs, LOOP_STAGES=loop_stages, LOOP_UNROLL=unroll,
                LOOP_WS=ws, OVERLAP_QK=overlap, BLOCK_N_TAIL=tail, ONE_LOOP=one, PERSISTENT=persist, GLUON=gluon,
                PV_ASYNC=pv_async, HEAVY_FIRST=heavy, GLUON_WS=gws, WS_REGS=None, PINGPONG=pingpong, Q_BUFS=qbufs,
                DYNAMIC=dyn, AHEAD=ahead, TMA_STORE=tstore)


def _name(c: dict | None) -> str:
    if c is None:
        return "table"
    flags = "".join(f" {f}" for f, on in ((f"Np{c['BLOCK_N_PAGED']}", c["BLOCK_N_PAGED"]), ("pair", c["PAIR_TILES"]),
                                          ("nopack", not c["PACK_GQA"]), ("blockwise", c["BLOCKWISE"]),
                                          ("rev", c["REVERSE"]), ("lazy", c["LAZY_RESCALE"]),
                                          (f"maxnreg{c['maxnreg']}", c["maxnreg"]),
                                          (f"seqvec{c['SEQ_VEC']}", c["SEQ_VEC"]), ("qs", c["Q_SCALED"]),
                                          (f"ls{c['LOOP_STAGES']}", c["LOOP_STAGES"]),
                                          (f"unroll{c['LOOP_UNROLL']}", c["LOOP_UNROLL"]), ("ws", c["LOOP_WS"]),
                                          ("overlap", c["OVERLAP_QK"]),
                                          (f"tail{c['BLOCK_N_TAIL']}", c["BLOCK_N_TAIL"]),
                                          (f"one{c.get('ONE_LOOP')}", c.get("ONE_LOOP")),
                                          (f"persist{c.get('PERSISTENT')}", c.get("PERSISTENT")),
                                          ("pv_async", c.get("PV_ASYNC")), ("heavy", c.get("HEAVY_FIRST"))) if on)
    flags += " (again)" if c.get("AGAIN") else ""
    if c.get("GLUON_WS"):  # 128 rows in two 64-row consumer warpgroups, a producer warp: only these keys matter
        return (f"gluon-ws N{c['BLOCK_N']} s{c['num_stages']}" + (f" overlap{int(c['OVERLAP_QK'])}" if c["OVERLAP_QK"] else "")
                + (" pingpong" if c.get("PINGPONG") else "")
                + (" one2" if c.get("ONE_LOOP") == 2 else "") + (f" regs{c['WS_REGS']}" if c.get("WS_REGS") else "")
                + (" persist" if c.get("PERSISTENT") else "") + (" heavy" if c.get("HEAVY_FIRST") else "")
                + (f" qbuf{c['Q_BUFS']}" if c.get("Q_BUFS", 2) != 2 else "") + (" dyn" if c.get("DYNAMIC") else "")
                + (" ahead" if c.get("AHEAD") else "")
                + (" tmastore" if c.get("TMA_STORE") else "")
                + (" (again)" if c.get("AGAIN") else ""))
    return f"{'gluon' if c.get('GLUON') else c['NEW_KV']} M{c['BLOCK_M']} N{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}{flags}"


# Rounds 1-7: bench/results/prefill_2026-11-29_h200.md (the table: 32 x 512 -> M64 N32 w4 s3 maxnreg168 one2,
# 77-81%; 8 x 2048 and 8192 -> M128 N128 w8 s3 tail32, 86-88% and 98-100%). Round 7: HEAVY_FIRST (`heavy`: every
# sequence's heaviest chunk tiles first, the sequence read from the slot) within noise on the Triton configs; the
# warp-specialized Gluon kernel (`gluon-ws`, gl.warp_specialize: a TMA producer warp, two 64-row consumer
# warpgroups) correct everywhere, 53-57% on 32 x 512 with one program per work item and 74-84% with a persistent
# grid (`persist`, the producer loading the next item under this one's work), its best (s3 N64, FlashAttention-3's
# order, ping-pong) above the table; the budget ran out before 8 x 2048's Gluon rows.
# Round 8: the persistent warp-specialized kernel with 128-key tiles, three stages (one q buffer per consumer),
# ping-pong and a dynamic queue reached 93.9% on 8 x 2048 and 108% at 8192; 64-key tiles with the static walk 82.7% on
# 32 x 512; the table now picks those for fresh prompts. Round 9 times the table as the engine launches it against
# the Triton picks it replaced, on every shape (the prefix ones keep BASE), and two 32 x 512 neighbours.
# Session 7 (32 x 512, bench/results/prefill_2026-11-29_h200.md): rounds 1-3 timed an item's last key tile computed
# and loaded only as wide as its keys and q held in registers (removed: they lost on every shape, and the 64-key
# build with two q buffers computed wrong values), AHEAD and TMA_STORE; round 4 the last two on the table's picks.
# Triton 3.6's tl.range(warp_specialize=True) is not timed again: upstream's persistent-matmul tutorial says it
# "only works on Blackwell right now. On older GPUs, this will use software pipelining" (round 3: the same build).
_WS = dict(gluon=True, gws=True, maxnreg=None, one=2, persist=1)  # the persistent warp-specialized Gluon kernel
_FA3 = dict(_WS, overlap=2, pingpong=True, heavy=True)  # FlashAttention-3's order, ping-pong, heaviest first
VARIANTS = [
    None,  # the dispatch table's pick for each shape
    _cfg(**_FA3, s=3),  # the table's < 1024 pick, explicitly
    # Round 4: TMA_STORE on the < 1024 pick (its 32 KB fit beside 64-key tiles), with AHEAD (the next item's mapping,
    # or ticket, one item early); round 4's winner (101.4% on 32 x 512) is the table's < 1024 pick since
    _cfg(**_FA3, s=3, tstore=True),
    _cfg(**_FA3, s=3, tstore=True, ahead=True),
    _cfg(**_FA3, s=3, ahead=True),
    _cfg(**_FA3, s=3, dyn=True, ahead=True, tstore=True),
    _cfg(**dict(_FA3, pingpong=False), s=3, tstore=True, ahead=True),  # the consumers free at item boundaries
    _cfg(**_FA3, n=128, s=3, qbufs=1, dyn=True),  # the >= 1024 pick
    _cfg(**_FA3, n=128, s=3, qbufs=1, dyn=True, ahead=True),  # ... the next ticket taken early
    _cfg(**_FA3, n=128, s=2, dyn=True, ahead=True, tstore=True),  # 128-key tiles with TMA_STORE's 32 KB: two stages
    dict(_cfg(**_FA3, s=3, tstore=True, ahead=True), AGAIN=True),  # drift
]
LAYOUT_CONFIGS = [_cfg(**_FA3, s=3, tstore=True, ahead=True)]
# Timed on every shape (the rest only on FOCUS; the Gluon ones only where there is no cached prefix).
WIDE = [None]  # + Gluon: fresh only


def make_problem(name: str, dev: torch.device, seed: int = 0):
    """q, the fused-qkv views k/v, the cache (prefix random, new tokens written by reshape_and_cache),
    tables, seq_lens, query_start_loc, the FLOP count, and SDPA's inputs [B, H, L, D]."""
    nseq, ctx, new = SHAPES[name]
    g = torch.Generator(device=dev).manual_seed(seed)
    L = ctx + new
    nb = triton.cdiv(L, BLOCK)
    kv_cache = torch.randn(2, nseq * nb, BLOCK, HKV, D, device=dev, dtype=DTYPE, generator=g)
    tables = torch.randperm(nseq * nb, device=dev, generator=g).to(torch.int32).view(nseq, nb)
    qkv = torch.randn(nseq * new, (HQ + 2 * HKV) * D, device=dev, dtype=DTYPE, generator=g)
    q = qkv[:, : HQ * D].view(-1, HQ, D)
    k = qkv[:, HQ * D: (HQ + HKV) * D].view(-1, HKV, D)
    v = qkv[:, (HQ + HKV) * D:].view(-1, HKV, D)
    pos = torch.arange(ctx, L, device=dev)
    slots = (tables[:, pos // BLOCK].long() * BLOCK + pos % BLOCK).reshape(-1)
    reshape_and_cache(k, v, kv_cache, slots)
    seq_lens = torch.full((nseq,), L, dtype=torch.int32, device=dev)
    qsl = torch.arange(0, nseq * new + 1, new, dtype=torch.int32, device=dev)
    flops = 4 * D * HQ * nseq * sum(ctx + i + 1 for i in range(new))  # only the keys each query sees
    kc = kv_cache[0][tables.long()].reshape(nseq, nb * BLOCK, HKV, D)[:, :L].transpose(1, 2).contiguous()
    vc = kv_cache[1][tables.long()].reshape(nseq, nb * BLOCK, HKV, D)[:, :L].transpose(1, 2).contiguous()
    qc = q.reshape(nseq, new, HQ, D).transpose(1, 2).contiguous()
    return dict(q=q, k=k, v=v, kv_cache=kv_cache, tables=tables, seq_lens=seq_lens, qsl=qsl, flops=flops,
                qc=qc, kc=kc, vc=vc, nseq=nseq, ctx=ctx, new=new)


def sdpa_fn(p):
    """SDPA over the contiguous copies; the chunked shape needs the bottom-right causal mask. Returns the
    first form that runs, and how it was called."""
    scale = D ** -0.5
    qc, kc, vc = p["qc"], p["kc"], p["vc"]
    if p["ctx"] == 0:
        return lambda: F.scaled_dot_product_attention(qc, kc, vc, scale=scale, is_causal=True,
                                                      enable_gqa=True), "is_causal"
    from torch.nn.attention.bias import causal_lower_right

    lq, lk = p["new"], p["ctx"] + p["new"]
    bias = causal_lower_right(lq, lk)
    kr, vr = (t.repeat_interleave(HQ // HKV, dim=1) for t in (kc, vc))
    dense = torch.ones(lq, lk, dtype=torch.bool, device=qc.device).tril(lk - lq)
    candidates = [
        ("causal_lower_right, gqa", lambda: F.scaled_dot_product_attention(qc, kc, vc, attn_mask=bias, scale=scale,
                                                                          enable_gqa=True)),
        ("causal_lower_right, kv heads repeated",
         lambda: F.scaled_dot_product_attention(qc, kr, vr, attn_mask=bias, scale=scale)),
        ("boolean mask, kv heads repeated",
         lambda: F.scaled_dot_product_attention(qc, kr, vr, attn_mask=dense, scale=scale)),
    ]
    for how, fn in candidates:
        try:
            fn()
            return fn, how
        except Exception as e:  # noqa: PERF203 - the next form is the fallback
            print(f"  SDPA {how}: {type(e).__name__}: {str(e)[:120]}")
    raise RuntimeError("no SDPA form ran on the chunked shape")


def sdpa_backends(p, quick: bool) -> dict:
    """Which backend the default SDPA call runs (its CUDA kernels' names, from the profiler) and each forced
    backend's time on the same call (kv heads repeated where a backend refuses enable_gqa)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fn, _ = sdpa_fn(p)
    out: dict = {}
    if not SMOKE:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        out["default_kernels"] = sorted({e.name[:90] for e in prof.events() if e.device_type.name == "CUDA"})
    qc, kc, vc = p["qc"], p["kc"], p["vc"]
    kr, vr = (t.repeat_interleave(HQ // HKV, dim=1) for t in (kc, vc))
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for how, args in (("gqa", dict(key=kc, value=vc, enable_gqa=True)), ("repeated", dict(key=kr, value=vr))):
            def call(args=args, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(qc, is_causal=True, scale=D ** -0.5, **args)
            try:
                call()
                ms = bench(call, quick)
                out[f"{backend.name} ({how})"] = dict(ms=ms, TFLOPs=p["flops"] / ms / 1e9)
                break
            except Exception as e:  # noqa: PERF203 - a backend that refuses this call is reported
                out[f"{backend.name} ({how})"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    print(f"  SDPA default runs: {out.get('default_kernels')}")
    for k, x in out.items():
        if k != "default_kernels":
            print(f"  SDPA forced {k}: " + (f"{x['ms'] * 1e3:.0f} us {x['TFLOPs']:.0f} TFLOP/s" if isinstance(x, dict) else x))
    return out


def run_kernel(p, cfg, plain: bool = False):
    """paged_prefill as the triton backend calls it (has_prefix only where there is a cached prefix, the
    longest query), with `cfg` (None: the table's pick); plain: without max_query_len (HEAVY_FIRST's fallback
    build, which ragged batches take)."""
    return lambda: paged_prefill(p["q"], p["kv_cache"], p["tables"], p["seq_lens"], p["qsl"], D ** -0.5,
                                 config=cfg, k=p["k"], v=p["v"], has_prefix=p["ctx"] > 0,
                                 max_query_len=None if plain else p["new"])


# A whole prompt, extends after cached prefixes, decodes, lengths off the block and tile grids, padding rows.
MIXED_STEPS = [(1500, 1500), (900, 257), (2100, 64), (333, 1), (1, 1), (4000, 1), (129, 129)]
# Fresh prompts only, of lengths on and off the tile grids (one of a single token).
FRESH_STEPS = [(1500, 1500), (257, 257), (64, 64), (1, 1), (129, 129), (33, 33), (700, 700)]
# Chunks of similar lengths, with and without cached prefixes: HEAVY_FIRST's grid (num_seqs x the longest chunk's
# tiles) stays within twice the plain one here, so the heavy variants take their own mapping (the two batches
# above are too ragged for it and check their fallback).
EVEN_STEPS = [(700, 512), (500, 500), (600, 448), (333, 333), (129, 129)]
EVEN_FRESH_STEPS = [(512, 512), (500, 500), (448, 448), (333, 333), (129, 129)]


def check_mixed(dev: torch.device) -> dict:
    """Every variant, and every config the table can pick for this head layout ("table"), on one mixed batch,
    one batch of fresh prompts only (has_prefix=False: the build the engine launches for those, and the Gluon
    kernel's only case) and two batches of even chunks (HEAVY_FIRST's mapping), with max_query_len as the
    backend passes it, against the float32 torch reference (max abs error <= 2e-2, the bf16 tolerance of
    tests/kernels); the rows after the batch's tokens must stay untouched. A Gluon config takes the two fresh
    batches only (launches with a cached prefix run the Triton kernel, whatever the config says)."""
    from paged_cases import make_batch

    steps = MIXED_STEPS if not SMOKE else [(40, 40), (30, 9), (21, 1), (1, 1)]
    fresh = FRESH_STEPS if not SMOKE else [(40, 40), (9, 9), (1, 1)]
    even = EVEN_STEPS if not SMOKE else [(40, 32), (30, 30), (20, 17)]
    even_fresh = EVEN_FRESH_STEPS if not SMOKE else [(32, 32), (30, 30), (17, 17)]
    batches = []
    for st, has_prefix in ((steps, True), (fresh, False), (even, True), (even_fresh, False)):
        b = make_batch([s for s, _ in st], [q for _, q in st], HQ, HKV, D, BLOCK, DTYPE, dev, num_padding_tokens=5)
        n = int(b.query_start_loc[-1])
        ref = paged_prefill_ref(b.q[:n], b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, D ** -0.5)
        batches.append((b, n, ref.float(), has_prefix, max(q for _, q in st)))
    results = {}
    picks = [dict(c, table=True) for c in table_configs(D, HQ // HKV, DTYPE)]
    for cfg in [c for c in VARIANTS if c is not None] + picks:
        name = _name({k: x for k, x in cfg.items() if k != "table"}) + (" (table)" if cfg.get("table") else "")
        if _name({k: x for k, x in cfg.items() if k != "table"}) in CRASHED:
            results[name] = dict(error="crashed, hung or failed in its precompile worker", ok=False)
            print(f"  mixed batch: {name} skipped (failed in its precompile worker)")
            continue
        try:
            errs, ok = [], True
            for b, n, ref, has_prefix, max_q in batches:
                if has_prefix and cfg.get("GLUON"):  # served by the Triton kernel: the Gluon ones serve fresh prompts
                    errs.append(None)
                    continue
                out = torch.full_like(b.q, float("nan"))
                kw = {k: x for k, x in cfg.items() if k != "table"}
                paged_prefill(b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, D ** -0.5, out=out,
                              config=kw, k=b.k, v=b.v, has_prefix=has_prefix, max_query_len=max_q)
                errs.append((out[:n].float() - ref).abs().max().item())
                ok = ok and errs[-1] <= 2e-2 and bool(out[n:].isnan().all())
            results[name] = dict(max_abs_err=errs[0], max_abs_err_fresh=errs[1], max_abs_err_even=errs[2],
                                 max_abs_err_even_fresh=errs[3], ok=ok)
        except Exception as e:
            results[name] = dict(error=f"{type(e).__name__}: {str(e)[:200]}", ok=False)
        if not results[name]["ok"]:
            print(f"  mixed batch: {name} FAILED {results[name]}")
    results["table"] = dict(ok=all(r["ok"] for k, r in results.items() if k.endswith(" (table)")))
    print(f"  mixed batch {steps}, fresh batch {fresh}, even batches {even} and {even_fresh}: "
          f"{sum(r['ok'] for r in results.values())} of {len(results)} variants correct")
    return results


# (dtype, group, head_dim) beside the timed layout (bf16, 4, 128): the default config on the mixed batch on all, and
# each LAYOUT_CONFIGS entry (with the variants above) on the fresh batch (the Gluon kernels' case) on those the
# Gluon kernels serve (group 1 / 2 / 4 / 8, head_dim 64 / 128).
LAYOUTS = [(torch.float16, 4, 128), (torch.bfloat16, 3, 64), (torch.bfloat16, 1, 128), (torch.float16, 2, 256),
           (torch.bfloat16, 2, 64), (torch.bfloat16, 8, 128)]


def _layout_configs(group: int, d: int) -> list:
    return [None] + (LAYOUT_CONFIGS if group in (1, 2, 4, 8) and d in (64, 128) else [])


def _layout_check(dtype: torch.dtype, group: int, d: int, cfg: dict | None, smoke: bool = False) -> str:
    """Worker (or in-process): one config on one head layout against the torch reference, at the dtype's test
    tolerance; None = the default config on the mixed batch, else `cfg` on the fresh batch (has_prefix=False)."""
    from paged_cases import TOLERANCE, make_batch

    if smoke:
        smoke_setup()
        dtype = torch.float32
    dev = torch.device("cpu" if smoke else "cuda")
    if cfg is None:
        steps = MIXED_STEPS if not smoke else [(40, 40), (30, 9), (1, 1)]
    else:
        steps = FRESH_STEPS if not smoke else [(40, 40), (9, 9), (1, 1)]
    hkv = 8 // min(group, 4)
    try:
        b = make_batch([s for s, _ in steps], [q for _, q in steps], group * hkv, hkv, d, BLOCK, dtype, dev,
                       num_padding_tokens=5)
        n = int(b.query_start_loc[-1])
        ref = paged_prefill_ref(b.q[:n], b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, d ** -0.5)
        out = torch.full_like(b.q, float("nan"))
        paged_prefill(b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, d ** -0.5, out=out,
                      k=b.k, v=b.v, config=cfg, has_prefix=cfg is None, max_query_len=max(q for _, q in steps))
        torch.testing.assert_close(out[:n].float(), ref.float(), **TOLERANCE[dtype])
        assert out[n:].isnan().all(), "padding rows written"
        return "ok"
    except Exception as e:
        return f"FAILED {type(e).__name__}: {str(e)[:300]}"


def check_layouts(pool_results: dict | None, dev: torch.device) -> dict:
    """The layout checks' results: from the precompile pool where it ran them, else run here."""
    results = {}
    for dtype, group, d in LAYOUTS[: 2 if SMOKE else None]:
        for cfg in _layout_configs(group, d):
            name = f"{'default config, mixed' if cfg is None else _name(cfg) + ', fresh'} batch, " \
                   f"{str(dtype).split('.')[-1]} group {group} d {d}"
            got = (pool_results or {}).get(name)
            if got is None and cfg is not None and _name(cfg) in CRASHED:
                got = "FAILED in its precompile worker (not run here)"
            results[name] = got if got is not None else _layout_check(dtype, group, d, cfg, SMOKE)
            print(f"  {name}: {results[name]}")
    return results


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = out.float(), ref.float()
    if a.isnan().any():
        return float("nan")
    return ((a - b).norm() / b.norm()).item()


def _warm(cfg: dict, smoke: bool = False) -> str | None:
    """Worker: compile one config into Triton's cache by running it once on small problems with the same
    head layout (so the same specialization), with a cached prefix and without (the has_prefix=False build)."""
    if smoke:
        smoke_setup()
    dev = torch.device("cpu" if smoke else "cuda")
    SHAPES["warm"] = (2, 48, 80) if not smoke else (1, 5, 9)
    # fresh prompts long enough that a persistent program walks several work items (its barriers' later phases)
    SHAPES["warm0"] = (4, 0, 1100) if not smoke else (1, 0, 9)
    SHAPES["warm33"] = (33, 0, 40) if not smoke else (1, 0, 5)  # more sequences than SEQ_VEC: the search build
    try:
        # A Gluon config is checked and timed on fresh prompts only (it serves no launch with a cached prefix).
        for shape in ("warm0", "warm33") if cfg.get("GLUON") else ("warm", "warm0", "warm33"):
            problem = make_problem(shape, dev)
            run_kernel(problem, cfg)()
            if cfg.get("HEAVY_FIRST") and shape != "warm33":  # the ragged batches' fallback is another build
                run_kernel(problem, cfg, plain=True)()
        if not smoke:
            torch.cuda.synchronize()
        if cfg.get("GLUON"):
            return _gate(cfg, dev)
    except Exception as e:  # reported again, with its name, by the timed process
        return f"{_name(cfg)}: {type(e).__name__}: {str(e)[:160]}"
    return None


def _gate(cfg: dict, dev: torch.device) -> str | None:
    """Worker: a Gluon config on check_mixed's fresh batches (plain and HEAVY_FIRST mappings) against the torch
    reference, before the timed process runs it: a config that computes wrong values or faults (an illegal address
    poisons the process's CUDA context, and every launch after it fails: round 1 of session 7) is excluded there."""
    from paged_cases import make_batch

    fresh = FRESH_STEPS if not SMOKE else [(40, 40), (9, 9), (1, 1)]
    even_fresh = EVEN_FRESH_STEPS if not SMOKE else [(32, 32), (30, 30), (17, 17)]
    for st in (fresh, even_fresh):
        b = make_batch([s for s, _ in st], [q for _, q in st], HQ, HKV, D, BLOCK, DTYPE, dev, num_padding_tokens=5)
        n = int(b.query_start_loc[-1])
        ref = paged_prefill_ref(b.q[:n], b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, D ** -0.5)
        out = torch.full_like(b.q, float("nan"))
        paged_prefill(b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, D ** -0.5, out=out,
                      config=cfg, k=b.k, v=b.v, has_prefix=False, max_query_len=max(q for _, q in st))
        err = (out[:n].float() - ref.float()).abs().max().item()
        if not err <= 2e-2 or not bool(out[n:].isnan().all()):
            return f"{_name(cfg)}: wrong on the fresh batch {st[0]}...: max abs error {err:.3g}"
    for shape in ("short", "prefill", "long"):  # the timed fresh shapes run once here first (a fault stays here)
        run_kernel(make_problem(shape, dev), cfg)()
        if not SMOKE:
            torch.cuda.synchronize()
    return None


PRECOMPILE_DEADLINE_S = 50  # a hung build (a barrier never signalled) costs this much of the run
CRASHED: set[str] = set()  # variants that crashed, hung or failed in a worker: never run in the timed process


def precompile(jobs: int) -> None:
    """Compile every variant and table config in worker processes. A compiler crash (an abort, not an
    exception) breaks the pool; the configs left unresolved are then compiled one process each, and one
    that kills its own process too is marked crashed and skipped."""
    if jobs <= 1:
        return None
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    t0 = time.time()
    cfgs = [c for c in VARIANTS if c is not None]
    cfgs += [c for c in table_configs(D, HQ // HKV, DTYPE) if c not in cfgs]
    ctx = multiprocessing.get_context("spawn")
    pending = cfgs
    layout_results: dict = {}
    for isolated in (False, True):
        if not pending:
            break
        # One process per job: a job that faults poisons its process's CUDA context for every later job there.
        pools = [ProcessPoolExecutor(1 if isolated else jobs, mp_context=ctx, max_tasks_per_child=1)
                 for _ in (pending if isolated else [0])]
        futures = [(c, pools[i if isolated else 0].submit(_warm, c, SMOKE)) for i, c in enumerate(pending)]
        layout_futures = []
        if not isolated:  # the layout checks, each its own compile, in the same pool after the variants
            for dtype, group, d in LAYOUTS:
                for lc in _layout_configs(group, d):
                    name = f"{'default config, mixed' if lc is None else _name(lc) + ', fresh'} batch, " \
                           f"{str(dtype).split('.')[-1]} group {group} d {d}"
                    layout_futures.append((name, pools[0].submit(_layout_check, dtype, group, d, lc, SMOKE)))
        pending = []
        hung = False
        for c, f in futures:
            try:
                err = f.result(timeout=max(1.0, t0 + PRECOMPILE_DEADLINE_S - time.time()))
                if err:  # wrong, or failed to run: never launched in the timed process
                    CRASHED.add(_name(c))
                    print(f"  precompile: {err}; skipped")
            except BrokenProcessPool:
                if isolated:
                    CRASHED.add(_name(c))
                    print(f"  precompile: {_name(c)}: the compiler killed its process; skipped")
                else:
                    pending.append(c)
            except TimeoutError:
                # A compile or a first launch that never ends (a kernel waiting on a barrier forever): skip it
                # rather than hang the device call.
                CRASHED.add(_name(c))
                hung = True
                print(f"  precompile: {_name(c)}: not done after {PRECOMPILE_DEADLINE_S} s; skipped")
        for name, f in layout_futures:
            try:
                layout_results[name] = f.result(timeout=max(1.0, t0 + PRECOMPILE_DEADLINE_S - time.time()))
            except BrokenProcessPool:
                layout_results[name] = None  # the pool broke under another job: run in the timed process
            except TimeoutError:  # not run in the timed process either: it may hang there
                layout_results[name] = f"FAILED: not done within the {PRECOMPILE_DEADLINE_S} s precompile deadline"
        for pool in pools:
            if hung:
                for proc in list(getattr(pool, "_processes", {}).values()):
                    proc.kill()
            pool.shutdown(wait=not hung, cancel_futures=True)
        if pending:
            print(f"  precompile: the pool broke; compiling {len(pending)} configs one process each")
    print(f"  precompiled {len(cfgs)} configs (and ran {len(layout_results)} layout checks) in "
          f"{time.time() - t0:.0f} s with {jobs} processes")
    return layout_results


def bench(fn, quick: bool) -> float:
    """Median milliseconds (one plain call under --smoke, where there is no GPU)."""
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 120, return_mode="median")


SMOKE = False


def smoke_setup() -> torch.device:
    """--smoke: the script's own logic on the CPU under TRITON_INTERPRET, tiny shapes, fp32, a few variants."""
    global SMOKE, DTYPE, VARIANTS, WIDE, LAYOUT_CONFIGS
    SMOKE, DTYPE = True, torch.float32
    SHAPES.update(prefill=(2, 0, 40), long=(1, 0, 72), chunked=(2, 35, 20), short=(3, 0, 16), extend=(2, 20, 20))
    VARIANTS = [None, _cfg(m=32, n=32, w=4, s=1, maxnreg=None), _cfg(m=16, n=16, w=4, s=1, qs=True, unroll=2),
                _cfg("paged", 16, 16, 4, 1, blockwise=True, qs=True, ws=True),
                _cfg("ptr", 32, 16, 4, 1, pack=False, n_paged=32, loop_stages=2),
                _cfg(m=32, n=32, w=4, s=1, pair=True, seq_vec=8), _cfg(m=32, n=16, w=4, s=1, overlap=True, qs=True),
                _cfg(m=32, n=32, w=4, s=1, tail=8), _cfg(m=32, n=16, w=4, s=1, one=2, persist=2, seq_vec=8),
                _cfg(m=32, n=16, w=4, s=1, one=1), _cfg(m=32, n=16, w=4, s=2, gluon=True),
                _cfg(m=32, n=16, w=4, s=1, heavy=True, one=2), _cfg(m=32, n=32, w=4, s=1, heavy=True, persist=2, tail=8),
                _cfg(m=32, n=16, w=4, s=2, gluon=True, gws=True, overlap=2, pingpong=True)]
    WIDE = list(VARIANTS)
    LAYOUT_CONFIGS = [_cfg(m=32, n=16, w=4, s=2, gluon=True, gws=True, overlap=2, pingpong=True, heavy=True)]
    return torch.device("cpu")


def table_pick(shape: str) -> dict:
    nseq, ctx, new = SHAPES[shape]
    return select_config(D, HQ // HKV, DTYPE, ctx > 0, new)


def print_table(rows: dict) -> dict:
    """The dispatch table the winners give (kernels/paged_prefill_configs.py TABLE): per shape's key, the keys
    of its best variant that differ from BASE; a best equal to BASE needs no entry."""
    table = {}
    print("\nthe table these winners give (kernels/paged_prefill_configs.py):\nTABLE = {")
    for shape, res in rows["results"].items():
        best = res.get("best")
        if best is None:
            continue
        nseq, ctx, new = SHAPES[shape]
        key = table_key(D, HQ // HKV, DTYPE, ctx > 0, new)
        cfg = res["variants"][best]["config"]
        diff = {k: x for k, x in cfg.items() if BASE.get(k) != x and k != "AGAIN"}
        share = f"{res['variants'][best]['of_sdpa']:.1%}"
        if str(key) in table:
            print(f"    # {shape}: same key as an earlier shape; its best was {best} ({share})")
            continue
        table[str(key)] = diff
        print(f"    {key!r}: dict({', '.join(f'{k}={x!r}' for k, x in diff.items())}),  # {shape}: {best}, {share}"
              if diff else f"    # {key!r}: BASE  ({shape}: {best}, {share})")
    print("}")
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--quick", action="store_true", help="shorter timings (a smoke run)")
    ap.add_argument("--smoke", action="store_true", help="check this script on the CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--budget", type=float, default=90.0,
                    help="seconds; past this the remaining variants are skipped (and listed) so the run ends")
    ap.add_argument("--shapes", nargs="+", default=list(TIMED), choices=list(SHAPES), help="timed shapes, in order")
    ap.add_argument("--backends", action="store_true", help="also time SDPA's forced backends (rounds 5-7 did)")
    args = ap.parse_args()
    t_start = time.time()
    if args.smoke:
        dev = smoke_setup()
        props = argparse.Namespace(name="cpu (interpreter smoke run)", multi_processor_count=0)
    elif not torch.cuda.is_available():
        sys.exit("bench/prefill_sweep.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    else:
        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
    rows: dict = dict(device=props.name, sms=props.multi_processor_count, date=datetime.date.today().isoformat(),
                      torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                      command="python " + " ".join(sys.argv), shapes={k: list(v) for k, v in SHAPES.items()},
                      results={})
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    layout_results = precompile(args.jobs)

    names = [_name(c) for c in VARIANTS]
    rows["mixed_batch"] = mixed = check_mixed(dev)
    rows["layouts"] = check_layouts(layout_results, dev)
    summary = []
    for shape in args.shapes:
        p = make_problem(shape, dev)
        sdpa, how = sdpa_fn(p)
        ref = sdpa().transpose(1, 2).reshape(-1, HQ, D)
        sdpa_ms = bench(sdpa, args.quick)
        sdpa_tf = p["flops"] / sdpa_ms / 1e9
        pick = table_pick(shape)
        pick_name = next((n for n, c in zip(names, VARIANTS) if c == pick), _name(pick))
        res = rows["results"][shape] = dict(sdpa_ms=sdpa_ms, sdpa_TFLOPs=sdpa_tf, sdpa=how, table_pick=pick_name,
                                            table_key=str(table_key(D, HQ // HKV, DTYPE, p["ctx"] > 0, p["new"])),
                                            variants={})
        print(f"\n{shape}: {SHAPES[shape]} (seqs, cached, new); SDPA ({how}) {sdpa_ms * 1e3:.0f} us "
              f"{sdpa_tf:.0f} TFLOP/s; the table picks {pick_name}")
        if args.backends and shape in FOCUS and p["ctx"] == 0:
            res["sdpa_backends"] = sdpa_backends(p, args.quick)
        for cfg, name in zip(VARIANTS, names):
            if (shape not in FOCUS and cfg not in WIDE) or (cfg is not None and cfg.get("GLUON") and p["ctx"] > 0):
                continue
            if time.time() - t_start > args.budget:
                print(f"  {name:50s} skipped: past the {args.budget:.0f} s budget")
                res["variants"][name] = dict(error="skipped: time budget")
                continue
            if name in CRASHED or not mixed.get(name, {}).get("ok"):
                res["variants"][name] = dict(error="failed the mixed-batch check or crashed the compiler")
                continue
            try:
                fn = run_kernel(p, cfg)
                err = rel_err(fn(), ref)
                if not err < 1e-2:
                    raise AssertionError(f"relative error {err:.2e} against SDPA")
                ms = bench(fn, args.quick)
            except Exception as e:  # a config that does not compile (shared memory) is reported, not fatal
                print(f"  {name:50s} FAILED {type(e).__name__}: {str(e)[:160]}")
                res["variants"][name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                continue
            tf = p["flops"] / ms / 1e9
            res["variants"][name] = dict(ms=ms, TFLOPs=tf, of_sdpa=tf / sdpa_tf, err=err, config=cfg or pick)
            print(f"  {name:50s} {ms * 1e3:8.0f} us {tf:5.0f} TFLOP/s {tf / sdpa_tf:6.1%} of SDPA  err {err:.1e}")
        timed = {n: r for n, r in res["variants"].items() if "ms" in r}
        if timed:
            best = res["best"] = min(timed, key=lambda n: timed[n]["ms"])
            table_share = timed.get("table", {}).get("of_sdpa", float("nan"))
            summary.append(f"  {shape:8s} best {best} {timed[best]['of_sdpa']:.1%} of SDPA; the table's pick "
                           f"({pick_name}) {table_share:.1%}")
        del p, ref

    print("\nper shape (% of SDPA):\n" + "\n".join(summary))
    rows["table"] = print_table(rows)
    rows["wall_s"] = time.time() - t_start
    default = f"prefill_sweep_{rows['date']}{'_smoke' if args.smoke else ''}.json"
    path = args.json or os.path.join(ROOT, "bench", "results", default)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {path} ({rows['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
