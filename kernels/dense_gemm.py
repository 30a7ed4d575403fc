"""16-bit dense GEMM y = x @ w.T for the few-to-medium row counts of decode steps, where cuBLAS's own pick
may leave bandwidth or SMs idle: Triton tiles, optionally "swapped" (the weight's rows fill the MMA's large
side and the step's few rows its small side, so Hopper's 64-row warpgroup MMA is not padded), and a
deterministic split-K (float32 partials summed by a second pass, never atomics: the same inputs give the
same bits every run).

Which shapes go here and with which launch is decided by measurement on the device (bench/chat_profile.py
sweeps configs against cuBLAS per (M, N, K)); the layers call it only where a measured table says it wins
(services/engine/model/layers/dense_dispatch.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels import pdl, splitk
from kernels.splitk import splitk_store


@triton.jit(do_not_specialize=["M"])  # one build serves every row count (each graph bucket has its own)
def _dense_gemm_kernel(
    x_ptr,  # [M, K] 16-bit, row stride stride_xm, unit column stride
    w_ptr,  # [N, K] same dtype, row stride stride_wn, unit column stride
    out_ptr,  # [M, N] x's dtype (SPLIT false) or [split_k, M, N] float32 partials (SPLIT)
    M, N, K, k_per_split, stride_xm, stride_wn, stride_om, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    PREFETCH: tl.constexpr = False,  # the first weight tile is loaded before waiting on the previous kernel
    PDL: tl.constexpr = False,  # kernels/pdl.py
):
    """One program: a [BLOCK_M, BLOCK_N] output tile over one K-slice (program_id(1)). SWAP accumulates the
    transposed tile [BLOCK_N, BLOCK_M] = w_tile @ x_tile.T (the same sums, other MMA shape).

    PREFETCH peels the first K-block off the loop and loads its weight tile before `pdl.enter`: no kernel
    writes the weights, so under PDL that load overlaps the previous kernel's tail (as the W4A16 GEMVs do);
    x, which the previous kernel writes, is read only after the wait."""
    if PREFETCH:
        pid, pid_k = tl.program_id(0), tl.program_id(1)
        num_n = tl.cdiv(N, BLOCK_N)
        offs_n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_first = pid_k * k_per_split + tl.arange(0, BLOCK_K)
        first_ok = (k_first < tl.minimum(K, pid_k * k_per_split + k_per_split))
        w_first = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + k_first[None, :],
                          mask=(offs_n < N)[:, None] & first_ok[None, :], other=0.0)
    pdl.enter(PDL)
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    if SWAP:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = k_start
    if PREFETCH:
        k = k_start + offs_k
        a = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & (k < k_end)[None, :], other=0.0)
        w = w_first
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        if SWAP:
            acc_t = tl.dot(w, tl.trans(a), acc_t)
        else:
            acc = tl.dot(a, tl.trans(w), acc)
        k_lo = k_start + BLOCK_K
    for k0 in range(k_lo, k_end, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_end
        a = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        if UPCAST:  # the interpreter's bfloat16 dot returns garbage; float32 products of 16-bit values are exact
            a, w = a.to(tl.float32), w.to(tl.float32)
        if SWAP:
            acc_t = tl.dot(w, tl.trans(a), acc_t)
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    if SWAP:
        acc = tl.trans(acc_t)
    splitk_store(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_os, out_ptr, out_ptr, pid, 1, SPLIT, False)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


DEFAULT_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SWAP=True, SPLIT_K=None, num_warps=4, num_stages=4)
"""Launch when the caller gives none: a weight-streaming shape for a few rows (the dispatch table's entries
are measured; this one only has to be correct)."""


def dense_gemm(x: torch.Tensor, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T -> [M, N] in x's dtype (float16 or bfloat16, both the same dtype).
    `config`: BLOCK_M, BLOCK_N, BLOCK_K (powers of two, >= 16), SWAP, SPLIT_K (None: enough K-slices for
    about two programs per SM), PREFETCH (the first weight tile loaded before the PDL wait), num_warps,
    num_stages."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must both be float16 or bfloat16, got {x.dtype} and {weight.dtype}")
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = cfg[key]
        if v < 16 or v & (v - 1):
            raise ValueError(f"{key} must be a power of two >= 16, got {v}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    blocks = triton.cdiv(k, cfg["BLOCK_K"])
    split = cfg.pop("SPLIT_K")
    if split is None:
        split = splitk.split_for(tiles, blocks, splitk.sm_count(x.device), per_sm=2, min_blocks=4)
    k_per_split = triton.cdiv(blocks, max(1, split)) * cfg["BLOCK_K"]
    split = max(1, triton.cdiv(k, k_per_split))
    out, _, _ = splitk.outputs(x, m, n, split, atomic=False)
    if m == 0 or n == 0:
        return splitk.finish(out, x.dtype)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    _dense_gemm_kernel[(tiles, split)](
        x, weight, out, m, n, k, k_per_split, x.stride(0), weight.stride(0), out.stride(-2),
        out.stride(0) if split > 1 else 0, SPLIT=split > 1, UPCAST=_interpreting(), num_warps=num_warps, num_stages=num_stages, **cfg, **pdl.args(x))
    return splitk.finish(out, x.dtype)


def dense_gemm_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float64 reference, returned in float64."""
    return x.double() @ weight.double().T


__all__ = ["dense_gemm", "dense_gemm_ref", "DEFAULT_CONFIG"]
