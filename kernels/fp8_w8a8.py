"""FP8 x FP8 GEMM on tensor cores for the middle batch sizes: y = (a * a_scale) @ (w * w_scale).T with a [M, K]
e4m3 activations quantized per token (kernels/fp8_quant.py), w [N, K] e4m3 with a per-channel scale, float32
accumulation, output in 16 bits. torch._scaled_mm's row-wise kernel leaves SMs idle on decode's M = 64..512
times a tall-K weight (Llama-3-8B's down: 64 output tiles on 132 SMs, K = 14336); this one cuts K into
slices in one launch (kernels/splitk.py) and orders the tiles so that the M tiles sharing a weight tile run
together (the weight is read from HBM once). bench/fp8.py measures it against _scaled_mm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import splitk
from kernels.splitk import splitk_store


@triton.jit
def _w8a8_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, K, k_per_split, split_k, stride_am, stride_wn, stride_om, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_n = pid % num_m, pid // num_m  # neighbours share a weight tile
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_end
        a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc)  # e4m3 x e4m3 -> float32; w [N, K] is the K-major operand wgmma wants
    a_s = tl.load(as_ptr + offs_m, mask=m_mask, other=0.0)
    w_s = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    acc = acc * a_s[:, None] * w_s[None, :]  # per slice: the scales distribute over the K-sum
    splitk_store(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_os, part_ptr, cnt_ptr, pid, split_k,
                 SPLIT, ATOMIC)


SPLIT_MAX_M = 512
"""Split-K runs up to this many rows: the workspace holds SPLIT_MAX_M x N sums (reserve_workspace, at load)."""

TUNED: dict[tuple[int, int, int], dict] = {
    # Llama-3-8B's qkv, o, gate_up, down on an H200 where this kernel beat torch._scaled_mm's row-wise GEMM by
    # more than 3%: bench/fp8.py round 1 (2026-11-29; bench/results/fp8_2026-11-29_h200_round1.log). Above
    # SPLIT_MAX_M rows K is not split (the run's 2048-row SPLIT_K 2 ran as 1).
    (64, 4096, 4096): {'BLOCK_M': 64, 'BLOCK_N': 128, 'BLOCK_K': 256, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 4},
    (64, 4096, 14336): {'BLOCK_M': 64, 'BLOCK_N': 128, 'BLOCK_K': 256, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 8},
    (64, 6144, 4096): {'BLOCK_M': 64, 'BLOCK_N': 64, 'BLOCK_K': 128, 'num_warps': 4, 'num_stages': 4, 'SPLIT_K': 1},
    (64, 28672, 4096): {'BLOCK_M': 64, 'BLOCK_N': 128, 'BLOCK_K': 128, 'num_warps': 4, 'num_stages': 4, 'SPLIT_K': 1},
    (256, 4096, 4096): {'BLOCK_M': 128, 'BLOCK_N': 64, 'BLOCK_K': 128, 'num_warps': 4, 'num_stages': 4, 'SPLIT_K': 1},
    (512, 6144, 4096): {'BLOCK_M': 128, 'BLOCK_N': 256, 'BLOCK_K': 128, 'num_warps': 8, 'num_stages': 3, 'SPLIT_K': 1},
    (2048, 4096, 4096): {'BLOCK_M': 128, 'BLOCK_N': 256, 'BLOCK_K': 128, 'num_warps': 8, 'num_stages': 3, 'SPLIT_K': 1},
    (2048, 4096, 14336): {'BLOCK_M': 128, 'BLOCK_N': 256, 'BLOCK_K': 128, 'num_warps': 8, 'num_stages': 3, 'SPLIT_K': 1},
    (2048, 6144, 4096): {'BLOCK_M': 128, 'BLOCK_N': 256, 'BLOCK_K': 128, 'num_warps': 8, 'num_stages': 3, 'SPLIT_K': 1},
}
"""(M bucket, N, K) -> launch config measured fastest by bench/fp8.py (else torch._scaled_mm runs). Layers
whose scales are deferred (quantization/fp8.py) run cuBLAS's tensor-wise GEMM instead."""


def m_bucket(m: int) -> int:
    """TUNED's row buckets: decode batches (64-512), a mixed step's (2048), a long prefill step's (8192)."""
    for b in (64, 128, 256, 512, 2048):
        if m <= b:
            return b
    return 8192


def pick_config(m: int, n: int, k: int) -> dict:
    hit = TUNED.get((m_bucket(m), n, k))
    if hit is not None:
        return dict(hit)
    bm = 64 if m <= 64 else 128
    return dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, num_warps=4 if bm == 64 else 8, num_stages=4)


def reserve_workspace(device: torch.device, n: int, k: int | None = None) -> None:
    """Reserve the split-K sums an [N, K] weight's GEMMs need: for every M bucket TUNED splits K in (all
    buckets up to SPLIT_MAX_M when k is None), bucket x N floats."""
    rows = [b for (b, nn, kk), cfg in TUNED.items() if nn == n and kk == k and cfg.get("SPLIT_K", 1) > 1] \
        if k is not None else [SPLIT_MAX_M]
    rows = [min(b, SPLIT_MAX_M) for b in rows]
    if rows:
        splitk.reserve(device, max(rows) * n)


def fp8_w8a8(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None,
             warmup: bool = False) -> torch.Tensor | None:
    """a [M, K] float8_e4m3fn with a_scale [M, 1] float32, weight [N, K] float8_e4m3fn with w_scale [N] (or
    [1, N]) float32 -> (a * a_scale) @ (weight * w_scale).T [M, N] in out_dtype. `config`: BLOCK_M, BLOCK_N,
    BLOCK_K, SPLIT_K (else chosen for about two programs per SM), ATOMIC, num_warps, num_stages.
    `warmup`: compile for these arguments and return None."""
    if a.dim() != 2 or weight.dim() != 2 or a.shape[1] != weight.shape[1]:
        raise ValueError(f"a must be [M, K] and weight [N, K], got {tuple(a.shape)} and {tuple(weight.shape)}")
    for name, t in (("a", a), ("weight", weight)):
        if t.dtype != torch.float8_e4m3fn or t.stride(1) != 1:
            raise ValueError(f"{name} must be float8_e4m3fn with a contiguous last dim, got {t.dtype} "
                             f"strides {t.stride()}")
    m, k = a.shape
    n = weight.shape[0]
    a_scale, w_scale = a_scale.reshape(-1), w_scale.reshape(-1)
    if a_scale.numel() != m or w_scale.numel() != n or a_scale.dtype != torch.float32 \
            or w_scale.dtype != torch.float32:
        raise ValueError(f"a_scale must be float32 [{m}] and w_scale float32 [{n}], got {a_scale.dtype} "
                         f"{tuple(a_scale.shape)} and {w_scale.dtype} {tuple(w_scale.shape)}")
    cfg = dict(config or pick_config(m, n, k))
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    blocks = triton.cdiv(k, cfg["BLOCK_K"])
    split = cfg.pop("SPLIT_K", None)
    if split is None:
        split = splitk.split_for(tiles, blocks, splitk.sm_count(a.device), 2, min_blocks=4) \
            if m <= SPLIT_MAX_M else 1
    elif m > SPLIT_MAX_M:
        split = 1
    k_per_split = triton.cdiv(blocks, split) * cfg["BLOCK_K"]
    split = triton.cdiv(k, k_per_split)
    atomic = cfg.pop("ATOMIC", True)
    out, ws, cnt = splitk.outputs(torch.empty(0, dtype=out_dtype, device=a.device), m, n, split, atomic)
    if m == 0:
        return splitk.finish(out, out_dtype)
    args = (a, a_scale, weight, w_scale, out, ws, cnt, m, n, k, k_per_split, split, a.stride(0), weight.stride(0),
            out.stride(-2), out.stride(0) if out.dim() == 3 else 0)
    consts = dict(cfg, SPLIT=split > 1, ATOMIC=atomic)
    if warmup:
        _w8a8_kernel.warmup(*args, grid=(tiles, split), **consts)
        return None
    _w8a8_kernel[(tiles, split)](*args, **consts)
    return splitk.finish(out, out_dtype)
