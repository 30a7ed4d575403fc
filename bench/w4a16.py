"""W4A16 decode on one GPU, Llama-3-8B shapes: check the GEMV variants, sweep them at M = 1, time the engine's
batch-1 decode (bf16 against W4A16), say where its time goes, and find the batch where W4A16 stops winning.
One run, under ~100 s on an H200 (bench/quant.py covers FP8 and the larger-M W4A16 kernels).

    python bench/w4a16.py [--json PATH] [--sections checks sweep engine] [--budget 95]
        [--engines w4a16+pdl+g3 w4a16+pdl+early+g4@16,64,256 bf16@16,64,256] [--sweep-kernels gemv3 gemv4]

1. checks (exit 1 on a failure): `gemv2`, `gemv3` and `gemv4` variants (blocks or rows per tile; per-block,
   per-slab or per-row scales; act-order; odd K and N; atomic and partial-sum split-K; gemv4's runs across
   column strips and FOLD; SwiGLU in the epilogue; programmatic dependent launch 0/1/2)
   against x @ dequant(w) in float32 with the split-K workspace left zeroed; a CUDA graph of three chained
   GEMVs (each reads the previous one's output, so a PDL launch that read x before its wait would show).
2. sweep (M = 1, the four 8B GEMMs): bf16 F.linear, the committed config, `gemv1`, the `gemv2` and `gemv3`
   grids (tile shape x warps x SPLIT_K, then PDL on the three best), the `gemv4` grid (tile shape x warps x
   programs per SM), plus a read-only
   kernel with gemv2's tiles and grid (the bandwidth its access pattern can reach). Timing as
   bench/quant.py: one CUDA graph over weight copies that overflow L2. The winners are checked as the engine
   runs them, then applied.
3. engine runs (--engines; default W4A16 (GPTQ config, random weights) then bf16), one engine each, tags after
   "+": pdl / nopdl (kernels/pdl.py's programmatic dependent launches on / off; else as the environment
   says), early / noearly (pdl.EARLY: each kernel lets the next launch before its own wait), g3 (the M = 1
   configs as committed), g4 (gemv4: the sweep's best per shape),
   unfused (the MLP's SwiGLU as its own launch, not in the gate/up GEMV's epilogue: quantization/int4.py's
   FUSE_SWIGLU), norace (temperature-1 sampling by the sampler's torch ops, not kernels/greedy.py's sample_race:
   services/engine/sampler.py's RACE), minsplitN (kernels/paged_decode.py's MIN_TOKENS_PER_SPLIT_FEW = N while
   the graphs are captured), normwN (kernels/fused_norm.py's WARPS = N: the norm's warps), prof (a
   profile of 32 decode steps: per kernel and kind the time each launch alone adds to the GPU's busy span, its own
   start-to-end (with PDL that counts its wait), launches, idle time). Each: batch-1 decode ms/token (128-token
   prompt, CUDA graphs); decode step time at the @ batches (output tok/s at 256 is the
   "throughput at 256 sequences" figure; the batch where W4A16 stops winning is the crossover); greedy
   tokens against the first run of the same weights.
4. chain (--sections chain): 32 layers' GEMVs in one CUDA graph with and without the add + RMSNorm kernels
   between them: what the norms add to a batch-1 step; the same with the norms on 8 and 4 warps.
5. attention (--sections attention): the batch-1 paged decode kernel on the 8B's heads at contexts 256 / 384, the
   default launch against more splits and other tiles (32 layers' caches in one graph).
Each engine run also times batch-1 decode greedily (temperature 0: the one-pass greedy kernel in place of the
temperature-1 sampler), so the sampler's share shows.
Sections past the time budget are skipped and say so.
--check-kernels h2x runs only the checks of the H2 layouts not swept before (`H2X_G3`, `H2X_G4`: warps along a tile's
rows, 8 columns per thread) and the committed configs; --sweep-kernels h2x sweeps them. --check-kernels h2 keeps only
the H2 cases of 1. (kernels/w4a16_half2.py); --sweep-kernels h2 adds its candidates to 2.
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
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quant as q  # noqa: E402  (bench/quant.py: weights, timing, engine helpers)
from kernels import fused_norm as fused_norm_mod  # noqa: E402
from kernels import pdl as pdl_mod  # noqa: E402
from kernels import splitk  # noqa: E402
from kernels import w4a16 as w4  # noqa: E402
from kernels import paged_decode as paged_decode_mod  # noqa: E402
from services.engine import sampler as sampler_mod  # noqa: E402
from services.engine.model.quantization import int4  # noqa: E402

DEV, DTYPE, SHAPES = q.DEV, q.DTYPE, q.SHAPES


# --- checks ----------------------------------------------------------------------------------------------
G2 = dict(KERNEL="gemv2", BLOCK_N=64, num_warps=2, num_stages=1)
G3 = dict(KERNEL="gemv3", T=8, BLOCK_N=128, num_warps=1, num_stages=1)  # XPAIR where x is bf16 (the default)
G4 = dict(KERNEL="gemv4", T=8, BLOCK_N=128, num_warps=1, num_stages=1)
CASES = [
    # (K, N, group, act-order, config, SPLIT_K, ATOMIC)
    (4096, 6144, 128, False, dict(G2), 8, True),
    (4224, 520, 128, True, dict(G2, UNROLL=2), 3, True),  # 33 blocks: a tile past the last block
    (4224, 520, 128, True, dict(G2, UNROLL=2, PDL=1), 3, True),
    (4224, 520, 128, False, dict(G2, PDL=2), 4, True),
    (4096, 1000, 32, False, dict(G2, BLOCK_N=128, num_warps=4), 4, False),  # per-row scales, partial sums
    (1000, 1000, 40, True, dict(G2, UNROLL=2, PDL=1), 2, True),
    (1088, 776, 32, False, dict(G2, BLOCK_N=32, num_warps=1), 4, True),  # 64-row blocks
    (640, 600, 640, False, dict(G2, BLOCK_N=256, num_warps=8), 2, True),  # one group over K
    (14336, 4096, 128, False, dict(G2, GROUP_MODE=2, PDL=1), 16, True),  # per-row scales forced
    (4096, 6144, 128, False, dict(G3), 8, True),
    (4224, 520, 128, True, dict(G3, PDL=1), 3, True),  # act-order, odd N, 33 blocks
    (4096, 1000, 32, False, dict(G3, BLOCK_N=256, num_warps=2, PDL=2), 4, False),  # 4 groups per block
    (1088, 776, 64, False, dict(G3, T=16), 4, True),  # 64-row blocks: T becomes 8
    (14336, 4096, 128, False, dict(G3, T=16, PDL=2), 1, True),
    (1000, 600, 16, True, dict(G3), 2, True),  # a group per nibble; K not a multiple of the block
    (4096, 6144, 128, False, dict(G3, XPAIR=False, maxnreg=128), 8, True),
    (4096, 1000, 32, False, dict(G3, T=16, PDL=1), 4, True),
    (4096, 6144, 128, False, dict(G3, FOLD=True, PDL=2), 8, True),  # FOLD: the zero point off per group
    (4224, 520, 128, True, dict(G3, FOLD=True, PDL=1), 3, True),
    (14336, 4096, 128, False, dict(G3, XPAIR=False, maxnreg=128, FOLD=True), 16, True),
    (4096, 1000, 32, False, dict(G3, BLOCK_N=256, num_warps=2, FOLD=True), 4, False),
    (4096, 6144, 128, False, dict(G3, T=16, FOLD=True, maxnreg=168, PDL=2), 16, True),
    (4096, 6144, 128, False, dict(G3, FOLD=True, maxnreg=96, PDL=2), 16, True),
    # gemv4 (kernels/w4a16_stream.py): the "split" column is PER_SM, programs per SM
    (4096, 6144, 128, False, dict(G4), 8, True),
    (4096, 6144, 128, False, dict(G4, PDL=2), 3, True),  # runs that cross strips
    (4224, 520, 128, True, dict(G4, PDL=1), 3, True),  # act-order, odd N, 33 blocks
    (4096, 1000, 32, False, dict(G4, BLOCK_N=256, num_warps=2, PDL=2), 5, True),  # 4 groups per block
    (1088, 776, 64, False, dict(G4), 7, True),  # 64-row blocks
    (14336, 4096, 128, False, dict(G4, XPAIR=False, maxnreg=128, PDL=2), 12, True),
    (1000, 600, 16, True, dict(G4), 2, True),  # a group per nibble; K not a multiple of the block
    (28672 // 7, 28672, 128, False, dict(G4, BLOCK_N=256, num_warps=2, PDL=2), 16, True),
    (4096, 6144, 128, False, dict(G4, FOLD=True, PDL=2), 8, True),  # FOLD: zero point off per group
    (4224, 520, 128, True, dict(G4, FOLD=True, PDL=1), 3, True),
    (4096, 1000, 32, False, dict(G4, FOLD=True, BLOCK_N=256, num_warps=2, T=16), 5, True),
    (14336, 4096, 128, False, dict(G4, FOLD=True, XPAIR=False, maxnreg=128, PDL=2), 12, True),
    # H2 (kernels/w4a16_half2.py: f16x2 decode and products; 1: a word per PTX block, 2: two, with x pairs)
    (4096, 6144, 128, False, dict(G3, H2=1, PDL=2), 8, True),
    (4096, 6144, 128, False, dict(G3, H2=2, BLOCK_N=256, num_warps=2, PDL=2), 16, True),
    (4224, 520, 128, True, dict(G3, H2=2, PDL=1), 3, True),  # act-order: H2 1; odd N, 33 blocks
    (4096, 1000, 32, False, dict(G3, H2=2, BLOCK_N=256, num_warps=2), 4, False),  # groups inside a block: not H2
    (14336, 4096, 128, False, dict(G3, H2=2, T=4, BLOCK_N=512, num_warps=2, PDL=2), 16, True),
    (4096, 6144, 128, False, dict(G4, H2=1, PDL=2), 8, True),
    (4096, 6144, 128, False, dict(G4, H2=2, BLOCK_N=256, num_warps=2, PDL=2), 8, True),
    (4224, 520, 128, True, dict(G4, H2=2, PDL=1), 3, True),
    (14336, 4096, 128, False, dict(G4, H2=2, T=4, BLOCK_N=512, num_warps=2, PDL=2), 12, True),
    (28672 // 7, 28672, 128, False, dict(G4, H2=2, T=4, BLOCK_N=256, PDL=2), 16, True),
]


def checks(failures: list, kernels=("gemv2", "gemv3", "gemv4")) -> list[dict]:
    rows: list[dict] = []
    g = torch.Generator(device=DEV).manual_seed(0)
    if "h2x" in kernels:  # only the new H2 layouts and what the engine runs at M = 1
        return h2x_checks(failures, g) + committed_checks(failures, g)
    cases = []
    for k, n, group, act, cfg, split, atomic in CASES:
        if cfg["KERNEL"] not in kernels or ("h2" in kernels and not cfg.get("H2")):  # h2: the H2 cases only
            continue
        qw, s, z, perm, w = q.int4_case(k, n, group, act, g)
        w4.reserve_workspace(DEV, n)
        x = torch.randn(1, k, generator=g, device=DEV).to(DTYPE)
        run = dict(cfg, PER_SM=split) if cfg["KERNEL"] == "gemv4" else dict(cfg, SPLIT_K=split, ATOMIC=atomic)
        cases.append((x, (qw, s, z, group, perm), w, run,
                      f"{k}x{n} g{group}{' act' if act else ''}"))
    q.precompile([lambda c=c: w4.w4a16(c[0], *c[1], config=c[3], warmup=True) for c in cases])
    for x, args, w, cfg, label in cases:
        perm = args[-1]
        ref = (x[:, perm.long()] if perm is not None else x).float() @ w
        for _ in range(2):  # twice: the first call must leave the workspace as the second needs it
            err = q.err_of(q.attempt(lambda: w4.w4a16(x, *args, config=cfg)), ref)
        q.record(rows, failures, err < 1e-2 and q.workspace_clean(), check=cfg["KERNEL"], shape=label, M=1, config=cfg,
                 rel_err=err)
    if "h2" in kernels:  # float16 range: activations in the thousands, one at 30,000 (kernels/w4a16_half2.py)
        qw, s, z, _, w = q.int4_case(4096, 6144, 128, False, g)
        x = (torch.randn(1, 4096, generator=g, device=DEV) * 2000).to(DTYPE)
        x[0, 17] = 30000.0
        for cfg in (dict(G3, H2=2, BLOCK_N=256, num_warps=2, SPLIT_K=16), dict(G4, H2=2, T=16, BLOCK_N=256, num_warps=2)):
            err = q.err_of(q.attempt(lambda: w4.w4a16(x, qw, s, z, 128, config=cfg)), x.float() @ w)
            q.record(rows, failures, err < 1e-2 and q.workspace_clean(), check="h2_large_x", shape="4096x6144", M=1,
                     config=cfg, rel_err=err)
    rows += chain_checks(failures, g, kernels=kernels)
    rows += committed_checks(failures, g)
    rows += gated_checks(failures, g)
    rows += race_checks(failures, g)
    return rows


def gated_checks(failures: list, g: torch.Generator) -> list[dict]:
    """The gate/up GEMV with SwiGLU in gemv4's or gemv3's epilogue (`gated`, as quantization/int4.py runs it at batch 1)
    against float32 x @ w, rounded to bf16, then torch's silu(gate) * up; also an odd inter."""
    rows, cases = [], []
    for k, inter, cfg in ((4096, 14336, dict(G4, PDL=2)),
                          (4096, 14336, dict(G4, PDL=2, FOLD=True)),
                          (4096, 14336, dict(G4, BLOCK_N=256, num_warps=2, PER_SM=4, PDL=2)),
                          (4096, 14336, dict(G4, XPAIR=False, maxnreg=128, PER_SM=16, PDL=1)),
                          (1024, 1000, dict(G4, PER_SM=3)),
                          (4096, 14336, dict(G3, BLOCK_N=256, num_warps=2, SPLIT_K=16, PDL=2)),
                          (4096, 14336, dict(G3, BLOCK_N=256, num_warps=2, SPLIT_K=16, PDL=2, FOLD=True)),
                          (4096, 14336, dict(G3, SPLIT_K=1)), (1024, 1000, dict(G3, SPLIT_K=3, FOLD=True)),
                          (4096, 14336, dict(G3, T=16, BLOCK_N=256, num_warps=2, SPLIT_K=16, FOLD=True, maxnreg=168)),
                          (4096, 14336, dict(G3, BLOCK_N=256, num_warps=2, SPLIT_K=16, PDL=2, H2=2)),
                          (4096, 14336, dict(G3, T=4, BLOCK_N=512, num_warps=2, SPLIT_K=16, PDL=2, H2=1)),
                          (4096, 14336, dict(G4, BLOCK_N=256, num_warps=2, PER_SM=8, PDL=2, H2=2)),
                          (1024, 1000, dict(G4, PER_SM=3, H2=2))):
        qw, s, z, _, w = q.int4_case(k, 2 * inter, 128, False, g)
        w4.reserve_workspace(DEV, 2 * inter)
        cases.append((k, inter, cfg, qw, s, z, w, torch.randn(1, k, generator=g, device=DEV).to(DTYPE)))
    q.precompile([lambda c=c: w4.w4a16(c[7], *c[3:6], 128, config=c[2], warmup=True, gated=True) for c in cases])
    for k, inter, cfg, qw, s, z, w, x in cases:
        gu = (x.float() @ w).to(DTYPE)
        ref = (F.silu(gu[:, :inter]) * gu[:, inter:]).float()
        err = q.err_of(q.attempt(lambda: w4.w4a16(x, qw, s, z, 128, config=cfg, gated=True)), ref)
        q.record(rows, failures, err < 1e-2 and q.workspace_clean(), check="gated", shape=f"{k}x2*{inter}", M=1,
                 config=cfg, rel_err=err)
    return rows


def race_checks(failures: list, g: torch.Generator) -> list[dict]:
    """kernels/greedy.py's sample_race (the sampler's plain-temperature path) on the 8B vocabulary: the same tokens as
    argmax(softmax(x / T) / noise) on the same noise, the logprob within 1e-4 of float64's."""
    from kernels.greedy import sample_race, sample_race_ref

    rows: list[dict] = []
    for n in (1, 4):
        x = (4 * torch.randn(n, 128256, generator=g, device=DEV)).to(DTYPE)
        temps = torch.linspace(0.5, 1.5, n, device=DEV)
        noise = torch.empty(n, 128256, device=DEV).exponential_(generator=g)
        got = q.attempt(lambda: sample_race(x, temps, noise))
        want = sample_race_ref(x.float(), temps, noise)
        ok = not isinstance(got, Exception) and torch.equal(got[0], want[0])
        err = (got[1].double() - want[1]).abs().max().item() if ok else float("inf")
        q.record(rows, failures, ok and err < 1e-4, check="sample_race", shape=f"{n}x128256", M=n, config={},
                 rel_err=err)
    return rows


def committed_checks(failures: list, g: torch.Generator) -> list[dict]:
    """What the engine runs at M = 1 (pick_config: TUNED) on each 8B GEMM, against float32."""
    rows, cases = [], []
    for name, (k, n) in SHAPES.items():
        qw, s, z, _, w = q.int4_case(k, n, 128, False, g)
        w4.reserve_workspace(DEV, n)
        cases.append((name, k, n, qw, s, z, w, torch.randn(1, k, generator=g, device=DEV).to(DTYPE)))
    q.precompile([lambda c=c: w4.w4a16(c[7], *c[3:6], 128, warmup=True) for c in cases])
    for name, k, n, qw, s, z, w, x in cases:
        err = q.err_of(q.attempt(lambda: w4.w4a16(x, qw, s, z, 128)), x.float() @ w)
        q.record(rows, failures, err < 1e-2 and q.workspace_clean(), check="committed", shape=name, M=1,
                 config=w4.pick_config(1, n, k, 128, DEV), rel_err=err)
    return rows


def chain_checks(failures: list, g: torch.Generator, configs: list | None = None,
                 kernels=("gemv2", "gemv3", "gemv4")) -> list[dict]:
    """Three o-shaped GEMVs captured in one CUDA graph, each on the previous one's output: after new values
    go into x, a replay equals the float32 chain (a PDL launch that read x or the workspace before its wait
    would not), and the workspace is left zeroed."""
    rows = []
    k, n = SHAPES["o"]
    mats = [q.int4_case(k, n, 128, False, g) for _ in range(3)]
    w4.reserve_workspace(DEV, n)
    configs = configs or [c for c in [dict(G, PDL=p, SPLIT_K=8) for G in (G2, G3) for p in (0, 1, 2)]
                          + [dict(G4, PDL=p) for p in (1, 2)]
                          if c["KERNEL"] in kernels]
    x0 = torch.randn(1, k, device=DEV).to(DTYPE)
    q.precompile([lambda c=c: w4.w4a16(x0, *mats[0][:3], 128, config=c, warmup=True) for c in configs])
    for cfg in configs:
        def chain(x, cfg=cfg):
            for qw, s, z, _, _ in mats:
                x = w4.w4a16(x, qw, s, z, 128, config=cfg) * 30.0  # keeps the values O(1)
            return x

        def ref_of(x):
            r = x.float()
            for *_, w in mats:
                r = (r.to(DTYPE).float() @ w).to(DTYPE).float() * 30.0
            return r

        def replay(cfg=cfg, chain=chain):
            x = torch.randn(1, k, generator=g, device=DEV).to(DTYPE)
            chain(x)  # compiles outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain(x)
            errs = []
            for _ in range(3):
                x.copy_(torch.randn(x.shape, generator=g, device=DEV).to(DTYPE))
                graph.replay()
                torch.cuda.synchronize()
                errs.append(q.rel_err(out, ref_of(x)))
            return max(errs)

        err = q.attempt(replay)
        err = float("inf") if isinstance(err, Exception) else err
        q.record(rows, failures, err < 2e-2 and q.workspace_clean(), check="gemv_chain_cuda_graph", shape="o x3",
                 M=1, config=cfg, rel_err=err)
    return rows


# --- sweep -----------------------------------------------------------------------------------------------
@triton.jit
def _read_tiles_kernel(qw_ptr, out_ptr, N, rows_total, rows_per_split, stride_qk,
                       T: tl.constexpr, BLOCK_N: tl.constexpr):
    """gemv2's memory traffic alone: the same [T, BLOCK_N] word tiles and grid, xor-folded (the read ceiling
    of that access pattern)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, T)
    r0 = pid_k * rows_per_split
    r1 = tl.minimum(rows_total, r0 + rows_per_split)
    acc = tl.zeros((T, BLOCK_N), dtype=tl.int32)
    for r in range(r0, r1, T):
        rr = r + offs_r
        acc ^= tl.load(qw_ptr + rr[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                       mask=(rr < r1)[:, None] & (offs_n < N)[None, :], other=0)
    tl.store(out_ptr + pid_k * N + offs_n, tl.xor_sum(acc, axis=0), mask=offs_n < N)


def read_only(qw, split, block_n, unroll, warps, warmup=False):
    rows, n = qw.shape
    per = triton.cdiv(triton.cdiv(rows // 16, split), unroll) * unroll * 16
    out = torch.empty(triton.cdiv(rows, per), n, dtype=torch.int32, device=qw.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(rows, per))
    args = (qw, out, n, rows, per, qw.stride(0))
    if warmup:
        return _read_tiles_kernel.warmup(*args, grid=grid, T=16 * unroll, BLOCK_N=block_n, num_warps=warps)
    _read_tiles_kernel[grid](*args, T=16 * unroll, BLOCK_N=block_n, num_warps=warps)
    return out


def gemv3_fold_candidates(n: int, k: int) -> list[dict]:
    """Around the committed gemv3 config of the shape (or the default one): FOLD off / on / on with XPAIR in 96
    registers (by Triton 3.6's sm_90 SASS: no spills, where gemv3 without FOLD spills at 96) / on with 16-word
    tiles in 168 registers (3.4 instructions per weight in the loop against 4.3 for the committed 8-word tiles
    without FOLD) x split-K halved, as is, doubled x (128 columns, 1 warp) or (256, 2)."""
    base = COMMITTED.get((1, n, k))
    base = dict(base) if base and base.get("KERNEL") == "gemv3" else dict(G3, XPAIR=True, SPLIT_K=16, PDL=2)
    blocks = -(-k // 128)
    out = []
    for bn, warps in ((128, 1), (256, 2)):
        for sp in sorted({max(1, base["SPLIT_K"] // 2), base["SPLIT_K"], min(blocks, base["SPLIT_K"] * 2)}):
            for fold in (False, True):
                out.append(dict(base, BLOCK_N=bn, num_warps=warps, SPLIT_K=sp, FOLD=fold))
            out.append(dict(base, BLOCK_N=bn, num_warps=warps, SPLIT_K=sp, FOLD=True, XPAIR=True, maxnreg=96))
            out.append(dict(base, T=16, BLOCK_N=bn, num_warps=warps, SPLIT_K=sp, FOLD=True, XPAIR=True, maxnreg=168))
    return out


def gemv4_fold_candidates() -> list[dict]:
    """gemv4 (128 columns, 1 warp, XPAIR) with 16 or 20 programs per SM: FOLD off in 128 registers, on in 128 or
    96 (no spills either way by Triton 3.6's sm_90 SASS; 96 lets 21 one-warp programs fit an SM's registers)."""
    return [dict(G4, XPAIR=True, PER_SM=per_sm, PDL=2, FOLD=fold, maxnreg=regs) for per_sm in (16, 20)
            for fold, regs in ((False, 128), (True, 128), (True, 96))]


R4_M1 = {
    (1, 6144, 4096): {'KERNEL': 'gemv3', 'T': 8, 'BLOCK_N': 256, 'num_warps': 2, 'num_stages': 1, 'XPAIR': True,
                      'SPLIT_K': 32, 'PDL': 2, 'FOLD': False},
    (1, 4096, 4096): {'KERNEL': 'gemv4', 'T': 8, 'BLOCK_N': 128, 'num_warps': 1, 'num_stages': 1, 'XPAIR': True,
                      'PER_SM': 20, 'PDL': 2, 'FOLD': True, 'maxnreg': 128},
    (1, 28672, 4096): {'KERNEL': 'gemv3', 'T': 8, 'BLOCK_N': 256, 'num_warps': 2, 'num_stages': 1, 'XPAIR': True,
                       'SPLIT_K': 16, 'PDL': 2, 'FOLD': True},
    (1, 4096, 14336): {'KERNEL': 'gemv3', 'T': 8, 'BLOCK_N': 256, 'num_warps': 2, 'num_stages': 1, 'XPAIR': False,
                       'SPLIT_K': 112, 'maxnreg': 128, 'PDL': 2, 'FOLD': True},
}
"""The float32 (FOLD) configs TUNED held before H2 (round 4 of the last session): swept beside H2 for reference."""


def h2_candidates(n: int, k: int) -> list[dict]:
    """H2 (kernels/w4a16_half2.py), two words per PTX block, around round 1's winners: gemv3 with 8 or 16 words by 256
    columns on 2 warps x split-K halved, as committed and doubled, and by 512 columns on 4 warps; gemv4 (256 columns, 2
    warps) with 8 to 16 programs per SM; the round-4 float32 config of the shape for reference."""
    base = COMMITTED.get((1, n, k))
    sp0 = base.get("SPLIT_K", 16) if base and base.get("KERNEL") == "gemv3" else 16
    blocks = -(-k // 128)
    out = []
    for t, bn, warps in ((8, 256, 2), (16, 256, 2), (8, 512, 4), (16, 512, 4)):
        for sp in sorted({max(1, sp0 // 2), sp0, min(blocks, 2 * sp0)}) if warps == 2 else (sp0,):
            out.append(dict(G3, T=t, BLOCK_N=bn, num_warps=warps, SPLIT_K=sp, PDL=2, H2=2))
    for t, per_sm in ((16, 8), (16, 12), (16, 16), (8, 12)):
        out.append(dict(G4, T=t, BLOCK_N=256, num_warps=2, PER_SM=per_sm, PDL=2, H2=2))
    if (1, n, k) in R4_M1:
        out.append(dict(R4_M1[(1, n, k)]))
    return out


H2X_G3 = ((16, 128, 4), (16, 128, 8), (8, 128, 4), (16, 256, 4), (8, 256, 1), (8, 512, 2))
"""(T, BLOCK_N, warps) of gemv3 H2 not swept before: BLOCK_N < 128 x warps puts warps along the tile's rows (each
thread computes fewer weights of a tile, the tile's sums meet in shared memory: a shorter path after the PDL wait),
BLOCK_N = 256 x warps gives each thread 8 columns (x's pairs, made per tile by every thread, shared by twice the
weights)."""
H2X_G4 = ((16, 128, 4, 8), (16, 128, 4, 16), (16, 128, 8, 8), (8, 256, 1, 12), (16, 256, 4, 8))
"""(T, BLOCK_N, warps, PER_SM) of gemv4 H2, the same two ideas on o's streamed grid."""


def h2x_candidates(n: int, k: int) -> list[dict]:
    """H2X_G3 x split-K (the committed one and half of it) where the committed config is gemv3, H2X_G4 where gemv4."""
    base = COMMITTED.get((1, n, k)) or {}
    out = []
    if base.get("KERNEL") == "gemv4":
        for t, bn, warps, per_sm in H2X_G4:
            out.append(dict(G4, T=t, BLOCK_N=bn, num_warps=warps, PER_SM=per_sm, PDL=2, H2=2))
        return out
    sp0 = base.get("SPLIT_K", 16)
    for t, bn, warps in H2X_G3:
        for sp in sorted({max(1, sp0 // 2), sp0}):
            out.append(dict(G3, T=t, BLOCK_N=bn, num_warps=warps, SPLIT_K=sp, PDL=2, H2=2))
    return out


def h2x_checks(failures: list, g: torch.Generator) -> list[dict]:
    """The H2X layouts against float32 on the 8B o shape and on odd shapes (a part-filled strip, a split past the
    last block, group 64), twice each (the workspace left as the next call needs it)."""
    rows = []
    cases = []
    for k, n, group in ((4096, 4096, 128), (4224, 520, 128), (2176, 1000, 64)):
        qw, s_, z_, _, w = q.int4_case(k, n, group, False, g)
        w4.reserve_workspace(DEV, n)
        x = torch.randn(1, k, generator=g, device=DEV).to(DTYPE)
        for t, bn, warps in H2X_G3:
            cases.append((x, (qw, s_, z_, group), w, dict(G3, T=t, BLOCK_N=bn, num_warps=warps, SPLIT_K=3, PDL=2, H2=2),
                          f"{k}x{n} g{group}"))
        for t, bn, warps, per_sm in H2X_G4:
            cases.append((x, (qw, s_, z_, group), w, dict(G4, T=t, BLOCK_N=bn, num_warps=warps, PER_SM=per_sm, PDL=2,
                                                          H2=2), f"{k}x{n} g{group}"))
    q.precompile([lambda c=c: w4.w4a16(c[0], *c[1], config=c[3], warmup=True) for c in cases])
    for x, args, w, cfg, label in cases:
        ref = x.float() @ w
        for _ in range(2):
            err = q.err_of(q.attempt(lambda: w4.w4a16(x, *args, config=cfg)), ref)
        q.record(rows, failures, err < 1e-2 and q.workspace_clean(), check="h2x", shape=label, M=1, config=cfg,
                 rel_err=err)
    for t, bn, warps in ((16, 128, 4), (16, 128, 8)):
        # gated (gate/up's SwiGLU epilogue) on an 8B-like shape
        k, n = 4096, 2 * 1024
        qw, s_, z_, _, w = q.int4_case(k, n, 128, False, g)
        w4.reserve_workspace(DEV, n)
        x = torch.randn(1, k, generator=g, device=DEV).to(DTYPE)
        gu = (x.float() @ w).to(DTYPE)
        ref = (F.silu(gu[:, :n // 2]) * gu[:, n // 2:]).float()
        cfg = dict(G3, T=t, BLOCK_N=bn, num_warps=warps, SPLIT_K=8, PDL=2, H2=2)
        err = q.err_of(q.attempt(lambda: w4.w4a16(x, qw, s_, z_, 128, config=cfg, gated=True)), ref)
        q.record(rows, failures, err < 1e-2 and q.workspace_clean(), check="h2x_gated", shape=f"{k}x{n}", M=1,
                 config=cfg, rel_err=err)
    return rows


def candidates(n: int, k: int) -> list[dict]:
    """gemv2 configs (tile width x warps x blocks per tile) and gemv3 configs (8 or 16 rows per tile, 128
    columns per warp), each with split-K 1 and 2 (no workspace, no atomics; the tail is a store) and around
    the automatic choice (about 4 programs per SM)."""
    blocks = -(-k // 128)
    sms = splitk.sm_count(DEV)
    out = []
    # (T, BLOCK_N, warps, XPAIR, maxnreg): by the sm_90 SASS, XPAIR T 8 takes 96 registers, T 16 168; without
    # XPAIR T 8 takes 154 (128 when capped, with no spills in the loop).
    for t, bn, warps, xpair, regs in ((8, 128, 1, True, None), (8, 256, 2, True, None), (8, 512, 4, True, None),
                                      (16, 128, 1, True, None), (8, 128, 1, False, None), (8, 128, 1, False, 128)):
        auto = splitk.split_for(-(-n // bn), blocks, sms, 4, max_split=64, min_blocks=1)
        for sp in sorted({1, 2, *q.splits_around(auto, blocks)}):
            out.append(dict(KERNEL="gemv3", T=t, BLOCK_N=bn, num_warps=warps, num_stages=1, XPAIR=xpair, SPLIT_K=sp,
                            **({"maxnreg": regs} if regs else {})))
    # gemv4: (T, BLOCK_N, warps, XPAIR, maxnreg) x programs per SM x FOLD, PDL 2
    # (by Triton 3.6's sm_90 SASS: 3.8-4.7 instructions per weight in the loop, 128-168 registers; FOLD ~10% fewer)
    for t, bn, warps, xpair, regs in ((8, 128, 1, True, None), (8, 256, 2, True, None), (8, 128, 1, True, 128),
                                      (8, 256, 1, True, None), (8, 128, 1, False, None), (8, 128, 1, False, 128),
                                      (16, 128, 1, True, None)):
        for per_sm in (4, 8, 16):
            for fold in (False, True):
                out.append(dict(G4, T=t, BLOCK_N=bn, num_warps=warps, XPAIR=xpair, PER_SM=per_sm, PDL=2, FOLD=fold,
                                **({"maxnreg": regs} if regs else {})))
    for bn, warps, unrolls in ((32, 1, (2,)), (64, 2, (1, 2)), (128, 4, (1,))):
        for unroll in unrolls:
            auto = splitk.split_for(-(-n // bn), blocks, sms, 4, max_split=32)
            for sp in sorted({1, 2, *q.splits_around(auto, blocks)}):
                if blocks // sp >= unroll:
                    out.append(dict(KERNEL="gemv2", BLOCK_N=bn, num_warps=warps, num_stages=1, UNROLL=unroll,
                                    SPLIT_K=sp))
    return out


def sweep(start: float, budget: float, kernels=("gemv1", "gemv2", "gemv3", "gemv4"), shapes=None) -> dict:
    g = torch.Generator(device=DEV).manual_seed(1)
    rows = []
    for name, (k, n) in ((s_, SHAPES[s_]) for s_ in (shapes or SHAPES)):
        if time.time() - start > budget:
            print(f"sweep {name}: skipped (time budget)", flush=True)
            continue
        bf = [(torch.randn(n, k, generator=g, device=DEV) * 0.02).to(DTYPE) for _ in range(q.copies_for(2 * n * k))]
        q4 = [q.int4_random(k, n, 128, g) for _ in range(q.copies_for(n * k // 2))]
        w4.reserve_workspace(DEV, n)
        x = torch.randn(1, k, generator=g, device=DEV).to(DTYPE)
        cands = [None] + [c for c in [dict(KERNEL="gemv1", BLOCK_N=64, num_warps=2, num_stages=1)] + candidates(n, k)
                          if c["KERNEL"] in kernels]
        if "gemv3-fold" in kernels:
            cands += gemv3_fold_candidates(n, k)
        if "gemv4-fold" in kernels:
            cands += gemv4_fold_candidates()
        if "h2" in kernels:
            cands += h2_candidates(n, k)
        if "h2x" in kernels:
            cands += h2x_candidates(n, k)
        q.precompile([lambda c=c: w4.w4a16(x, *q4[0][:3], 128, config=c, warmup=True) for c in cands])
        row = {"shape": name, "M": 1, "K": k, "N": n, "bf16_ms": q.graph_ms([lambda w=w: F.linear(x, w) for w in bf])}
        res = []

        def timed(cfg):
            try:
                ms = q.graph_ms([lambda a=a: w4.w4a16(x, *a[:3], 128, config=cfg) for a in q4])
            except Exception as e:  # a config that does not compile or launch: say so, go on
                print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                return
            res.append({"config": cfg or "default", "ms": ms})

        for cfg in cands:
            timed(cfg)
        g2 = sorted((r for r in res if isinstance(r["config"], dict) and r["config"]["KERNEL"] in ("gemv2", "gemv3")),
                    key=lambda r: r["ms"])
        if {"gemv2", "gemv3"} & set(kernels):
            q.precompile([lambda c=r["config"]: w4.w4a16(x, *q4[0][:3], 128, config=dict(c, PDL=p), warmup=True)
                          for r in g2[:3] for p in (1, 2)])
        for r in g2[:3] if {"gemv2", "gemv3"} & set(kernels) else []:  # PDL on the three best: back to back in
            for p in (1, 2):  # the graph, as the engine's layers are not
                timed(dict(r["config"], PDL=p))
        g4 = min((r for r in res if isinstance(r["config"], dict) and r["config"]["KERNEL"] == "gemv4"),
                 key=lambda r: r["ms"], default=None)
        if g4 is not None:
            BEST_G4[(1, n, k)] = dict(g4["config"])
            row["best_gemv4"] = g4
        best = min(res, key=lambda r: r["ms"])
        for label, pred in (("H2", lambda c: c.get("H2")),):
            bl = min((r for r in res if isinstance(r["config"], dict) and pred(r["config"])), key=lambda r: r["ms"],
                     default=None)
            if bl is not None:
                row["best_" + label] = bl
                print(f"  {name} best {label}: {bl['ms']:.4f} ms {bl['config']}", flush=True)
        bc = best["config"] if isinstance(best["config"], dict) else {}
        read = []
        sp = bc.get("SPLIT_K", 1)
        probes = [("tiles", bc.get("BLOCK_N", 64), bc.get("num_warps", 2), bc.get("UNROLL", 1)),
                  ("tiles", 128, 4, 2), ("flat", 528, 4, 0), ("flat", 1056, 8, 0)]
        for kind, bn, warps, unroll in probes:
            try:
                if kind == "tiles":
                    ms = q.graph_ms([lambda a=a: read_only(a[0], sp, bn, unroll, warps) for a in q4])
                else:  # bn programs of `warps` warps, each streaming a contiguous chunk
                    ms = q.graph_ms([lambda a=a: q.read_flat(a[0], bn, 2048, warps) for a in q4])
                read.append({"kind": kind, "BLOCK_N": bn, "num_warps": warps, "UNROLL": unroll, "SPLIT_K": sp,
                             "ms": ms, "GB_s": n * k // 2 / ms / 1e6})
            except Exception as e:
                print(f"  read-only {name} {kind}: {type(e).__name__}: {str(e)[:160]}", flush=True)
        row["w4a16"], row["read_only"] = res, read
        rows.append(row)
        nbytes = n * k // 2 + n * k // 128 * 3
        rb = min((r for r in read if r["kind"] == "tiles"), key=lambda r: r["ms"], default={"ms": float("nan")})
        rf = min((r for r in read if r["kind"] == "flat"), key=lambda r: r["ms"], default={"ms": float("nan")})
        d = next(r["ms"] for r in res if r["config"] == "default")
        print(f"{name:<8} bf16 {row['bf16_ms']:.4f}  committed {d:.4f}  best {best['ms']:.4f} "
              f"({nbytes / best['ms'] / 1e6:.0f} GB/s, {row['bf16_ms'] / best['ms']:.2f}x bf16) {best['config']}  "
              f"read-only: its tiles {n * k // 2 / rb['ms'] / 1e6:.0f} GB/s, contiguous {n * k // 2 / rf['ms'] / 1e6:.0f} GB/s",
              flush=True)
        del bf, q4
        torch.cuda.empty_cache()
    return {"rows": rows}


def print_sweep(result: dict) -> None:
    rows = result["rows"]
    print("\nM = 1 per GEMM (ms per call; GB/s = int4 weights + scales and zeros read per second):")
    print("(read-only GB/s: gemv2's tiles and grid without the arithmetic; contiguous chunks per program)")
    print(f"{'shape':<8}{'bf16':>8}{'commit':>8}{'gemv1':>8}{'gemv2':>8}{'gemv3':>8}{'+PDL':>8}{'gemv4':>8}{'GB/s':>6}{'x bf16':>8}"
          f"{'tiles':>7}{'flat':>7}")
    tot = dict(bf16=0.0, commit=0.0, best=0.0)
    for r in rows:
        def best_of(pred):
            ms = [c["ms"] for c in r["w4a16"] if pred(c["config"])]
            return min(ms) if ms else float("nan")
        d = best_of(lambda c: c == "default")
        g1 = best_of(lambda c: isinstance(c, dict) and c["KERNEL"] == "gemv1")
        g2 = best_of(lambda c: isinstance(c, dict) and c["KERNEL"] == "gemv2" and not c.get("PDL"))
        g3 = best_of(lambda c: isinstance(c, dict) and c["KERNEL"] == "gemv3" and not c.get("PDL"))
        g2p = best_of(lambda c: isinstance(c, dict) and c["KERNEL"] in ("gemv2", "gemv3") and c.get("PDL"))
        g4 = best_of(lambda c: isinstance(c, dict) and c["KERNEL"] == "gemv4")
        b = min(c["ms"] for c in r["w4a16"])
        nk = r["N"] * r["K"]
        rd = max((c["GB_s"] for c in r["read_only"] if c["kind"] == "tiles"), default=float("nan"))
        rf = max((c["GB_s"] for c in r["read_only"] if c["kind"] == "flat"), default=float("nan"))
        print(f"{r['shape']:<8}{r['bf16_ms']:>8.4f}{d:>8.4f}{g1:>8.4f}{g2:>8.4f}{g3:>8.4f}{g2p:>8.4f}{g4:>8.4f}"
              f"{(nk // 2 + nk // 128 * 3) / b / 1e6:>6.0f}{r['bf16_ms'] / b:>8.2f}{rd:>7.0f}{rf:>7.0f}")
        tot["bf16"] += r["bf16_ms"]
        tot["commit"] += d
        tot["best"] += b
    if len(rows) == len(SHAPES):
        print(f"{'layer':<8}{tot['bf16']:>8.4f}{tot['commit']:>8.4f}{'':>48}{tot['bf16'] / tot['best']:>8.2f}"
              f"   (best sum {tot['best']:.4f} ms)")
        result["layer_ms"] = tot
    print("\nWinners (paste into kernels/w4a16.py TUNED):")
    for r in rows:
        b = min(r["w4a16"], key=lambda c: c["ms"])
        print(f"    (1, {r['N']}, {r['K']}): {b['config']!r},  # {b['ms']:.4f} ms")


def apply_winners(result: dict) -> dict:
    """Check each shape's fastest config as the engine runs it (the real shape, then in a chained graph);
    apply the ones that pass for the decode sections."""
    failures: list = []
    rows = []
    g = torch.Generator(device=DEV).manual_seed(5)
    applied = {}
    for r in result["rows"]:
        b = min(r["w4a16"], key=lambda c: c["ms"])["config"]
        if b == "default":
            continue
        k, n = r["K"], r["N"]
        qw, s, z, _, w = q.int4_case(k, n, 128, False, g)
        w4.reserve_workspace(DEV, n)
        x = torch.randn(1, k, generator=g, device=DEV).to(DTYPE)
        err = q.err_of(q.attempt(lambda: w4.w4a16(x, qw, s, z, 128, config=b)), x.float() @ w)
        ok = err < 1e-2 and q.workspace_clean()
        q.record(rows, failures, ok, check="winner", shape=r["shape"], M=1, config=b, rel_err=err)
        if ok:
            applied[(1, n, k)] = b
    used = list({json.dumps(c, sort_keys=True) for c in applied.values()})
    rows += chain_checks(failures, g, [json.loads(c) for c in used])
    bad = {json.dumps(f["config"], sort_keys=True) for f in failures if f["check"] != "winner"}
    for key, c in applied.items():
        if json.dumps(c, sort_keys=True) not in bad:
            w4.TUNED[key] = dict(c)
    print(f"\nwinners: {len(rows) - len(failures)}/{len(rows)} checks pass; the engine section runs:")
    for key in sorted(k for k in w4.TUNED if k[0] == 1):
        print(f"    {key}: {w4.TUNED[key]!r},")
    for f in failures:
        print("FAILED", f)
    return {"checks": rows, "failures": failures, "tuned": {str(k): v for k, v in w4.TUNED.items() if k[0] == 1}}


# --- chain ---------------------------------------------------------------------------------------------
CHAIN_LAYERS = 32


def chain(start: float, budget: float) -> dict:
    """What a batch-1 layer's kernels cost in sequence, without attention and rotary: one CUDA graph of 32 layers
    of qkv -> o -> gate/up (SwiGLU in its epilogue) -> down, each layer on its own weights (3.6 GB of 4-bit: read
    from HBM), each GEMV reading the previous one's output, with and without the two add + RMSNorm kernels per
    layer (kernels/fused_norm.py) between them: what the norms add to the chain, the most that moving them into the
    GEMVs could save. Also: 64 norms alone in a chain (each reads the previous one's output)."""
    from kernels import fused_norm, pdl
    from kernels.fused_norm import add_rms_norm

    g = torch.Generator(device=DEV).manual_seed(11)
    hidden = SHAPES["o"][1]
    nw = (1 + 0.1 * torch.randn(hidden, generator=g, device=DEV)).to(DTYPE)
    res = torch.randn(1, hidden, generator=g, device=DEV).to(DTYPE)
    x0 = torch.randn(1, hidden, generator=g, device=DEV).to(DTYPE)
    out: dict = {}
    w = {name: [q.int4_random(k, n, 128, g) for _ in range(CHAIN_LAYERS)] for name, (k, n) in SHAPES.items()}
    for k, n in SHAPES.values():
        w4.reserve_workspace(DEV, n)

    def lin(x, name, l, **kw):
        qw, s, z = w[name][l]
        return w4.w4a16(x, qw, s, z, 128, **kw)

    def w4_chain(norms: bool):
        def run():
            h = x0
            for l in range(CHAIN_LAYERS):
                a = add_rms_norm(h, res, nw, 1e-5) if norms else h
                o = lin(lin(a, "qkv", l)[:, :hidden], "o", l)
                a = add_rms_norm(o, res, nw, 1e-5) if norms else o
                h = lin(lin(a, "gate_up", l, gated=True), "down", l)
            return h
        return run


    def norms_only():
        h = x0
        for _ in range(2 * CHAIN_LAYERS):
            h = add_rms_norm(h, res, nw, 1e-5)
        return h

    saved, saved_tuned = pdl.ENABLED, dict(w4.TUNED)
    # (name, graph, M = 1 configs, norm warps): the committed configs; the norms at 16 (the rule's width at 4096), 8
    # and 4 warps
    rows = [("w4a16 GEMVs", w4_chain(False), COMMITTED, None), ("w4a16 GEMVs + norms", w4_chain(True), COMMITTED, None),
            ("w4a16 GEMVs + norms w8", w4_chain(True), COMMITTED, 8),
            ("w4a16 GEMVs + norms w4", w4_chain(True), COMMITTED, 4),
            ("64 norms", norms_only, COMMITTED, None), ("64 norms w8", norms_only, COMMITTED, 8),
            ("64 norms w4", norms_only, COMMITTED, 4)]
    for name, fn, cfgs, warps in rows:
        if time.time() - start > budget:
            print(f"chain {name}: skipped (time budget)", flush=True)
            continue
        pdl.ENABLED = True
        w4.TUNED.update({key: dict(c) for key, c in cfgs.items()})
        fused_norm.WARPS = warps
        ms = q.attempt(lambda: q.graph_ms([fn]))
        out[name] = ms if isinstance(ms, float) else repr(ms)
        print(f"chain {name:<34} {ms if isinstance(ms, float) else float('nan'):8.3f} ms", flush=True)
    pdl.ENABLED = saved
    fused_norm.WARPS = None
    w4.TUNED.clear()
    w4.TUNED.update(saved_tuned)
    del w
    q.free_gpu()
    a, b = out.get("w4a16 GEMVs"), out.get("w4a16 GEMVs + norms")
    if isinstance(a, float) and isinstance(b, float):
        print(f"chain: the norms add {(b - a) * 1e3 / (2 * CHAIN_LAYERS):.2f} us each to the W4A16 chain "
              f"({(b - a) * 1e3:.0f} us per token); GEMVs {a * 1e3 / CHAIN_LAYERS:.1f} us per layer", flush=True)
    return out


# --- attention at batch 1 ---------------------------------------------------------------------------------
def attention(start: float, budget: float) -> dict:
    """kernels/paged_decode.py at one sequence on the 8B's heads (32 q, 8 KV, d 128, 16-token blocks), contexts
    256 and 384 (the engine section's decode runs 128 -> 384): 32 launches in one CUDA graph, each on its own
    layer's cache, as the engine's default launch (one split under 512 tokens) against splits 2-8 and other tiles;
    each checked against one split first. Per launch us."""
    from kernels.paged_decode import paged_decode

    g = torch.Generator(device=DEV).manual_seed(13)
    layers, hq, hkv, d, bs = 32, 32, 8, 128, 16
    out: dict = {}
    for ctx in (256, 384):
        blocks = ctx // bs
        caches = [torch.randn(2, blocks, bs, hkv, d, generator=g, device=DEV).to(DTYPE) for _ in range(layers)]
        table = torch.arange(blocks, dtype=torch.int32, device=DEV)[None, :]
        lens = torch.tensor([ctx], dtype=torch.int32, device=DEV)
        q0 = torch.randn(1, hq, d, generator=g, device=DEV).to(DTYPE)
        ref = paged_decode(q0, caches[0], table, lens, d ** -0.5, max_seq_len=ctx, num_splits=1)
        variants = [("default", None, None)] + [(f"split {sp}", sp, None) for sp in (2, 4, 8)] + [
            ("split 1 tile 128 w8", 1, dict(TILE_N=128, num_warps=8)), ("split 4 tile 32 w4", 4, dict(TILE_N=32))]
        for name, sp, cfg in variants:
            if time.time() - start > budget:
                print(f"attention ctx {ctx} {name}: skipped (time budget)", flush=True)
                continue
            got = q.attempt(lambda: paged_decode(q0, caches[0], table, lens, d ** -0.5, max_seq_len=ctx,
                                                 num_splits=sp, config=cfg))
            err = q.err_of(got, ref.float()) if not isinstance(got, Exception) else float("inf")
            fns = [lambda c=c: paged_decode(q0, c, table, lens, d ** -0.5, max_seq_len=512, num_splits=sp, config=cfg)
                   for c in caches]
            ms = q.attempt(lambda: q.graph_ms(fns)) if err < 1e-2 else float("nan")
            us = ms * 1e3 if isinstance(ms, float) else float("nan")
            out[f"ctx {ctx} {name}"] = {"us": us, "rel_err": err}
            print(f"attention ctx {ctx} {name:<22} {us:7.2f} us  (rel err {err:.1e})", flush=True)
        del caches
    return out


# --- engine ----------------------------------------------------------------------------------------------
COMMITTED = {key: dict(c) for key, c in w4.TUNED.items() if key[0] == 1}
"""The M = 1 configs as committed (before a sweep's winners are applied): engine runs tagged +g3 use them."""
MIN_SPLIT = paged_decode_mod.MIN_TOKENS_PER_SPLIT_FEW
"""kernels/paged_decode.py's shortest split where few programs run (batch 1 here) as committed: runs tagged
+minsplitN use N (the decode graphs are captured for max_model_len 512, so N = 512 gives the batch-1 graph one
split, as before 2026-11-29 evening, 128 four, 64 eight)."""
DEFAULTS = {"pdl": pdl_mod.ENABLED, "early": pdl_mod.EARLY}
"""kernels/pdl.py's settings as the environment left them: runs without a pdl / nopdl, early / noearly tag."""
BEST_G4: dict = {}
"""(1, N, K) -> the sweep's fastest gemv4 config: engine runs tagged +g4 use them (else G4 with PDL 2)."""


def m1_configs(tags: list[str]) -> None:
    """Set the M = 1 entries of kernels/w4a16.py's TUNED for an engine run's tags: g3 (as committed), g4 (gemv4:
    the sweep's best, else G4)."""
    if "g3" in tags:
        w4.TUNED.update({key: dict(c) for key, c in COMMITTED.items()})
    if "g4" in tags:
        for k, n in SHAPES.values():
            w4.TUNED[(1, n, k)] = dict(BEST_G4.get((1, n, k), dict(G4, PDL=2)))
    if "nopdl" in tags:  # the committed configs name PDL 2: off means off for the GEMVs too
        for key in [key for key in w4.TUNED if key[0] == 1]:
            w4.TUNED[key] = dict(w4.TUNED[key], PDL=0)
    print(f"  M = 1 configs for +{'+'.join(tags)}: " + "; ".join(
        f"{n}x{k}: {w4.TUNED.get((1, n, k))}" for k, n in SHAPES.values()), flush=True)


KINDS = (("w4a16", ("w4a16",)), ("attention", ("paged", "attention", "flash", "sdpa")),
         ("cuBLAS GEMM", ("gemm", "gemv", "nvjet", "cutlass", "sm90", "cublas")), ("norm", ("norm",)),
         ("rotary", ("rotary", "rope")), ("kv cache write", ("cache",)), ("activation", ("silu", "act", "gelu")),
         ("sampling", ("argmax", "softmax", "sort", "topk", "sample", "reduce")))



def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(key in low for key in keys):
            return kind
    return "other"


def profile_decode(llm, steps: int = 32) -> dict:
    """GPU kernels of `steps` batch-1 decode steps (prefill and the first token subtracted out)."""
    from torch.profiler import ProfilerActivity, profile

    from folio import SamplingParams

    prompt = {"prompt_token_ids": list(range(1000, 1128))}

    def kernels(n):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False)
            torch.cuda.synchronize()
        evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and
               "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
        return evs

    def exclusive(evs):
        """Per event, the time it alone adds to the GPU's busy span: its end past every earlier-started kernel's
        end (with PDL a kernel starts early and waits; that wait is its predecessor's time, not its own)."""
        out, frontier, idle = [], None, 0.0
        for e in sorted(evs, key=lambda e: e.time_range.start):
            a, b = e.time_range.start, e.time_range.end
            if frontier is not None and a > frontier:
                idle += a - frontier
            out.append(max(0.0, b - max(a, frontier if frontier is not None else a)))
            frontier = b if frontier is None else max(frontier, b)
        return out, idle

    one, full = kernels(1), kernels(steps + 1)
    (x_one, idle_one), (x_full, idle_full) = exclusive(one), exclusive(full)
    by: dict[str, list] = {}
    for e, x, sign in [(e, x, 1) for e, x in zip(sorted(full, key=lambda e: e.time_range.start), x_full)] + \
            [(e, x, -1) for e, x in zip(sorted(one, key=lambda e: e.time_range.start), x_one)]:
        k = by.setdefault(e.name, [0, 0.0, 0.0])
        k[0] += sign
        k[1] += sign * e.time_range.elapsed_us()
        k[2] += sign * x
    busy = sum(e.time_range.elapsed_us() for e in full) - sum(e.time_range.elapsed_us() for e in one)
    top = sorted(((v[2] / steps, v[1] / steps, v[0] / steps, name) for name, v in by.items() if v[0] > 0), reverse=True)
    kinds: dict[str, list] = {}
    for ex, us, cnt, name in top:
        kk = kinds.setdefault(kind_of(name), [0.0, 0.0, 0.0])
        kk[0] += us
        kk[1] += cnt
        kk[2] += ex
    return {"busy_us_per_token": busy / steps, "launches_per_token": sum(c for _, _, c, _ in top),
            "exclusive_us_per_token": sum(ex for ex, _, _, _ in top), "idle_us_per_token": (idle_full - idle_one) / steps,
            "by_kind": {k: {"us": v[0], "launches": v[1], "exclusive_us": v[2]}
                        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][2])},
            "top": [{"kernel": n[:90], "us": us, "launches": c, "exclusive_us": ex} for ex, us, c, n in top[:20]]}


def engine(start: float, budget: float, runs: list[str], profile_it: bool = True, steps: int = 32) -> dict:
    """Per run ("w4a16" or "bf16", "+pdl" for kernels/pdl.py on, "@16,64,256" for the batches), one engine: batch-1
    decode ms/token as (t(257 tokens) - t(1)) / 256 on a 128-token prompt, its kernel profile, then decode
    step ms at each batch, (t(steps + 1) - t(1)) / steps on 64-token prompts. Mixed-step graphs stop at 256
    tokens (they serve prefill here, which the differences cancel; fewer to capture)."""
    from folio import SamplingParams

    from kernels import pdl

    decode, cross, failed = [], [], []

    def left() -> float:
        return budget - (time.time() - start)

    all_batches: list[int] = []
    for n, spec in enumerate(runs):
        run_name, _, at = spec.partition("@")
        batches = tuple(int(b) for b in at.split(",") if b)
        all_batches += [b for b in batches if b not in all_batches]
        name, *tags = run_name.split("+")
        later = len(runs) - n - 1  # engines still to come after this one: ~10 s each at least
        first = not any(r["weights"].split("+")[0] == name for r in decode)
        if left() < (18 if first and name == "w4a16" else 10):  # start + batch-1: ~15 s cold for W4A16, ~8 s warm
            print(f"engine {run_name}: skipped (time budget)", flush=True)
            continue
        pdl.ENABLED = "pdl" in tags or (DEFAULTS["pdl"] and "nopdl" not in tags)
        pdl.EARLY = "early" in tags or (DEFAULTS["early"] and "noearly" not in tags)
        int4.FUSE_SWIGLU = "unfused" not in tags
        sampler_mod.RACE = "norace" not in tags
        fused_norm_mod.WARPS = next((int(t[5:]) for t in tags if t.startswith("normw") and t[5:].isdigit()), None)
        paged_decode_mod.MIN_TOKENS_PER_SPLIT_FEW = next(
            (int(t[8:]) for t in tags if t.startswith("minsplit") and t[8:].isdigit()), MIN_SPLIT)
        saved = dict(w4.TUNED)
        m1_configs(tags)
        try:  # one engine's failure (a capture error of an opt-in lever) must not lose the later runs
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.time()
                llm = q.make_llm(tmp, name, max_model_len=512, max_num_seqs=max(batches, default=1),
                                 gpu_memory_utilization=0.6, max_mixed_graph_tokens=256)
                startup = time.time() - t0

                def run(prompts, n, temperature=1.0):
                    t = time.perf_counter()
                    llm.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True, temperature=temperature),
                                 use_tqdm=False)
                    return time.perf_counter() - t

                one_prompt = [{"prompt_token_ids": list(range(1000, 1128))}]
                tokens = llm.generate(one_prompt, SamplingParams(max_tokens=64, ignore_eos=True, temperature=0),
                                      use_tqdm=False)
                one, full = min(run(one_prompt, 1) for _ in range(2)), min(run(one_prompt, 257) for _ in range(2))
                row = {"weights": run_name, "ms_per_token": (full - one) / 256 * 1e3, "startup_s": startup,
                       "tokens": list(tokens[0].outputs[0].token_ids)}
                one, full = min(run(one_prompt, 1, 0.0) for _ in range(2)), min(run(one_prompt, 257, 0.0) for _ in range(2))
                row["ms_per_token_greedy"] = (full - one) / 256 * 1e3  # the one-pass greedy kernel, no sampling
                print(f"engine decode {run_name}: {row['ms_per_token']:.3f} ms/token, greedy {row['ms_per_token_greedy']:.3f} "
                      f"(startup {startup:.0f} s)", flush=True)
                if profile_it and "prof" in tags and left() > 10 * later + 5:  # bf16's kernels: see bench/quant.py
                    p = q.attempt(lambda: profile_decode(llm))
                    row["profile"] = p if isinstance(p, dict) else repr(p)
                    if isinstance(p, dict):
                        print_profile(p, row["ms_per_token"])
                decode.append(row)
                cross.append({"weights": run_name, "batch": 1, "ms_per_step": row["ms_per_token"],
                              "output_tok_s": 1e3 / row["ms_per_token"]})
                for b in batches:
                    if left() < 9 * later + 3:  # leave the later engines ~9 s each
                        print(f"crossover {run_name} B={b}: skipped (time budget)", flush=True)
                        continue
                    prompts = [{"prompt_token_ids": [(1000 + 7 * i + t) % 120000 for t in range(64)]} for i in range(b)]
                    run(prompts, 4)
                    ms = (run(prompts, steps + 1) - run(prompts, 1)) / steps * 1e3
                    cross.append({"weights": run_name, "batch": b, "ms_per_step": ms, "output_tok_s": b / ms * 1e3})
                    print(f"crossover {run_name} B={b}: {ms:.2f} ms/step, {b / ms * 1e3:.0f} output tok/s", flush=True)
                llm.shutdown()
                del llm, run
                q.free_gpu()
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            print(f"engine {run_name}: FAILED {e!r}", flush=True)
            failed.append({"weights": run_name, "error": repr(e)})
            q.free_gpu()
        pdl.ENABLED, pdl.EARLY = DEFAULTS["pdl"], DEFAULTS["early"]
        int4.FUSE_SWIGLU = True
        sampler_mod.RACE = True
        fused_norm_mod.WARPS = None
        paged_decode_mod.MIN_TOKENS_PER_SPLIT_FEW = MIN_SPLIT
        w4.TUNED.clear()
        w4.TUNED.update(saved)
    for r in decode:  # the same dummy weights: kernels and launch modes must not change the greedy tokens
        first = next(f for f in decode if f["weights"].split("+")[0] == r["weights"].split("+")[0])
        if first is not r:
            same = next((i for i, (x, y) in enumerate(zip(first["tokens"], r["tokens"])) if x != y), len(r["tokens"]))
            r["same_tokens_as"] = [first["weights"], same]
            print(f"{r['weights']}: the first {same} of {len(r['tokens'])} greedy tokens equal {first['weights']}'s "
                  f"(split-K's float atomics may flip a near-tie late)")
    base = next((r for r in decode if r["weights"] == "bf16"), None)
    print("\nBatch-1 decode, whole engine (Llama-3-8B shape, random weights, CUDA graphs; +pdl: kernels/pdl.py on):")
    for r in decode:
        r["speedup"] = base["ms_per_token"] / r["ms_per_token"] if base else None
        greedy = base.get("ms_per_token_greedy") if base else None
        r["speedup_greedy"] = greedy / r["ms_per_token_greedy"] if greedy else None
        print(f"  {r['weights']:<12}{r['ms_per_token']:>8.3f} ms/token  {r['speedup'] or float('nan'):.2f}x bf16   "
              f"greedy {r['ms_per_token_greedy']:.3f} ms/token  {r['speedup_greedy'] or float('nan'):.2f}x")
    if len(cross) > len(decode):
        print("\nDecode step time by batch (ms/step, output tok/s; the speed-up is bf16 ms / W4A16 ms):")
        for b in (1, *sorted(all_batches)):
            rb = next((r for r in cross if r["weights"] == "bf16" and r["batch"] == b), None)
            for rw in (r for r in cross if r["weights"].startswith("w4a16") and r["batch"] == b):
                up = f"{rb['ms_per_step'] / rw['ms_per_step']:.2f}x" if rb else "-"
                print(f"  B={b:<4} {rw['weights']:<12}{rw['ms_per_step']:>8.2f} ms {rw['output_tok_s']:>8.0f} tok/s   "
                      f"bf16 {rb['ms_per_step'] if rb else float('nan'):>7.2f} ms {rb['output_tok_s'] if rb else float('nan'):>8.0f} "
                      f"tok/s   {up}")
    return {"decode": decode, "crossover": cross, "failed": failed}


def print_profile(p: dict, ms_per_token: float) -> None:
    """By kind and by kernel: 'own' is each launch's start-to-end (with PDL it includes waiting for the previous
    kernel), 'excl' the time it alone adds to the busy span (the columns that sum to the step, with 'idle')."""
    print(f"  GPU kernels {p['busy_us_per_token']:.0f} us/token own, {p['exclusive_us_per_token']:.0f} exclusive, "
          f"idle between kernels {p['idle_us_per_token']:.0f}, in {p['launches_per_token']:.0f} launches "
          f"(step {ms_per_token * 1e3:.0f} us)")
    print(f"    {'kind':<16}{'excl us':>9}{'own us':>9}{'launches':>9}")
    for kind, v in p["by_kind"].items():
        print(f"    {kind:<16}{v['exclusive_us']:>9.1f}{v['us']:>9.1f}{v['launches']:>9.1f}")
    print(f"      {'excl us':>8}{'own us':>8}{'launches':>9}{'excl each':>10}  kernel")
    for t in p["top"]:
        print(f"      {t['exclusive_us']:>8.1f}{t['us']:>8.1f}{t['launches']:>9.1f}"
              f"{t['exclusive_us'] / max(t['launches'], 1e-9):>10.2f}  {t['kernel']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--sections", nargs="+", default=["checks", "sweep", "engine"],
                    choices=["checks", "sweep", "chain", "attention", "engine"])
    ap.add_argument("--budget", type=float, default=95.0, help="seconds; later sections are skipped past it")
    ap.add_argument("--check-kernels", nargs="+", default=["gemv2", "gemv3", "gemv4"],
                    help="checks: the M = 1 kernels whose variants are checked (the committed configs always are)")
    ap.add_argument("--no-profile", action="store_true", help="engine: skip the kernel profile")
    ap.add_argument("--engines", nargs="+", default=["w4a16+prof@16,64,256", "bf16@16,64,256"],
                    help="engine runs in order: w4a16 | bf16, then tags +pdl +early +g3 +g4 +unfused +prof (the "
                         "module docstring), @B1,B2 (decode step time at these batches: the crossover)")
    ap.add_argument("--attention-share", type=float, default=0.5,
                    help="attention: no new variant is started past this share of --budget")
    ap.add_argument("--chain-share", type=float, default=0.5,
                    help="chain: no new variant is started past this share of --budget")
    ap.add_argument("--sweep-shapes", nargs="+", default=None, choices=list(SHAPES),
                    help="sweep: these 8B GEMMs, in this order (default: all)")
    ap.add_argument("--sweep-share", type=float, default=0.4,
                    help="sweep: no new shape is started past this share of --budget")
    ap.add_argument("--sweep-kernels", nargs="+", default=["gemv1", "gemv2", "gemv3", "gemv4"],
                    help="sweep: the M = 1 kernels to try (gemv3-fold: the committed gemv3 configs with FOLD off "
                         "and on, split-K and tile width around them; gemv4-fold: gemv4 with FOLD and 96 registers; h2: gemv3 "
                         "and gemv4 with kernels/w4a16_half2.py's packed-half arithmetic)")
    args = ap.parse_args()
    start = time.time()
    failures: list = []
    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(DEV),
              "torch": torch.__version__, "triton": triton.__version__}
    if "checks" in args.sections:
        result["checks"] = checks(failures, args.check_kernels)
        print(f"{len(result['checks'])} checks, {len(failures)} failed ({time.time() - start:.0f} s)", flush=True)
        for r in failures:
            print("FAILED", r)
        result["failures"] = failures
    if "sweep" in args.sections:
        got = q.attempt(lambda: sweep(start, args.budget * args.sweep_share, args.sweep_kernels, args.sweep_shapes))
        result["sweep"] = got if not isinstance(got, Exception) else repr(got)
        if isinstance(got, dict):
            print_sweep(got)
            result["applied"] = q.attempt(lambda: apply_winners(got))
        print(f"sweep done at {time.time() - start:.0f} s", flush=True)
    if "chain" in args.sections:
        got = q.attempt(lambda: chain(start, args.budget * args.chain_share))
        result["chain"] = got if not isinstance(got, Exception) else repr(got)
        print(f"chain done at {time.time() - start:.0f} s", flush=True)
    if "attention" in args.sections:
        got = q.attempt(lambda: attention(start, args.budget * args.attention_share))
        result["attention"] = got if not isinstance(got, Exception) else repr(got)
        print(f"attention done at {time.time() - start:.0f} s", flush=True)
    if "engine" in args.sections:
        got = q.attempt(lambda: engine(start, args.budget, args.engines, not args.no_profile))
        result["engine"] = got if not isinstance(got, Exception) else repr(got)
        print(f"engine done at {time.time() - start:.0f} s", flush=True)
    result["seconds"] = round(time.time() - start, 1)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"w4a16_{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\n{len(failures)} check failure(s); {result['seconds']} s; wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
