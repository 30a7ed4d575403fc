"""FP8 weights times 16-bit activations for decode's few rows: y = x @ (w * scale).T with w [N, K] float8 e4m3
read once (half the bytes of bf16), converted in registers; the activations are not quantized. Per output
channel scale (per-tensor scales arrive spread over their rows) applied to the float32 sums. Split-K as in
kernels/splitk.py. Larger M goes to torch._scaled_mm with quantized activations
(services/engine/model/quantization/fp8.py chooses by M).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import splitk
from kernels.splitk import splitk_store


@triton.jit
def _fp8_w8a16_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, k_per_split, split_k, stride_xm, stride_wn, stride_om, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    SPLIT: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr,
):
    """USE_DOT: tensor cores on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tiles (M up to a tile); else
    multiply-adds into float32 registers summed over K at the end: [BLOCK_N, BLOCK_K] when BLOCK_M = 1
    (batch-1 decode, two dimensions only), [BLOCK_M, BLOCK_N, BLOCK_K] for a few rows."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    dt = x_ptr.dtype.element_ty
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif BLOCK_M == 1:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_end
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        if USE_DOT:
            a = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, tl.trans(w.to(dt)), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w.to(dt)), acc)
        elif BLOCK_M == 1:
            xk = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + k, mask=k_mask, other=0.0).to(tl.float32)
            acc2 += w.to(tl.float32) * xk[None, :]
        else:
            a = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc3 += a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if not USE_DOT:
        if BLOCK_M == 1:
            acc = tl.sum(acc2, axis=1)[None, :]
        else:
            acc = tl.sum(acc3, axis=2)
    scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    acc = acc * scale[None, :]
    splitk_store(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_os, ws_ptr, cnt_ptr, pid, split_k, SPLIT, ATOMIC)


SPLIT_MAX_M = 64
"""As in kernels/w4a16.py: the split-K workspace holds SPLIT_MAX_M x N sums, reserved at load."""

TUNED: dict[tuple[int, int, int], dict | str] = {
    # Llama-3-8B's qkv, o, gate_up, down on an H200: bench/quant.py round 1's winners (2026-11-29).
    (1, 4096, 4096): {'BLOCK_M': 1, 'BLOCK_N': 32, 'BLOCK_K': 256, 'USE_DOT': False, 'num_warps': 4, 'num_stages': 2, 'SPLIT_K': 4},
    (1, 4096, 14336): {'BLOCK_M': 1, 'BLOCK_N': 32, 'BLOCK_K': 256, 'USE_DOT': False, 'num_warps': 4, 'num_stages': 2, 'SPLIT_K': 8},
    (1, 28672, 4096): {'BLOCK_M': 1, 'BLOCK_N': 32, 'BLOCK_K': 256, 'USE_DOT': False, 'num_warps': 4, 'num_stages': 2, 'SPLIT_K': 1},
    (16, 4096, 4096): {'BLOCK_M': 16, 'BLOCK_N': 64, 'BLOCK_K': 128, 'USE_DOT': True, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 8},
    (16, 4096, 14336): {'BLOCK_M': 16, 'BLOCK_N': 64, 'BLOCK_K': 256, 'USE_DOT': True, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 8},
    (16, 6144, 4096): {'BLOCK_M': 16, 'BLOCK_N': 64, 'BLOCK_K': 128, 'USE_DOT': True, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 8},
    (16, 28672, 4096): {'BLOCK_M': 16, 'BLOCK_N': 64, 'BLOCK_K': 256, 'USE_DOT': True, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 2},
}
"""(M bucket 1/16/64/256, N, K) -> the launch config measured fastest (bench/quant.py's winner table), or
"scaled_mm" where quantized activations + torch._scaled_mm won (services/engine/model/quantization/fp8.py
reads that)."""


def m_bucket(m: int) -> int:
    return 1 if m <= 1 else 16 if m <= 16 else 64 if m <= 64 else 256


def pick_config(m: int, n: int, k: int) -> dict:
    hit = TUNED.get((m_bucket(m), n, k))
    if isinstance(hit, dict):
        return dict(hit)
    if m <= 2:
        return dict(BLOCK_M=triton.next_power_of_2(max(m, 1)), BLOCK_N=32, BLOCK_K=128, USE_DOT=False,
                    num_warps=4, num_stages=2)
    return dict(BLOCK_M=16 if m <= 16 else 64, BLOCK_N=64, BLOCK_K=128, USE_DOT=True, num_warps=4, num_stages=3)


def reserve_workspace(device: torch.device, n: int) -> None:
    splitk.reserve(device, SPLIT_MAX_M * n)


def fp8_w8a16(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, config: dict | None = None,
              warmup: bool = False) -> torch.Tensor | None:
    """x [M, K] (fp16/bf16/fp32) @ (weight [N, K] float8_e4m3fn * scale [N] float32).T -> [M, N] in x's dtype.
    `config` overrides `pick_config`: BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, SPLIT_K, ATOMIC, num_warps,
    num_stages. `warmup`: compile for these arguments and return None without running."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight must be float8_e4m3fn, got {weight.dtype}")
    m, k = x.shape
    n = weight.shape[0]
    scale = scale.reshape(-1)
    if scale.numel() != n or scale.dtype != torch.float32:
        raise ValueError(f"scale must be float32 with one entry per output row ({n}), got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    cfg = dict(config or pick_config(m, n, k))
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    blocks = triton.cdiv(k, cfg["BLOCK_K"])
    split = cfg.pop("SPLIT_K", None)
    if split is None:
        per_sm = 2 if cfg["USE_DOT"] else 4
        split = splitk.split_for(tiles, blocks, splitk.sm_count(x.device), per_sm, min_blocks=4) if m <= SPLIT_MAX_M else 1
    k_per_split = triton.cdiv(blocks, split) * cfg["BLOCK_K"]
    split = triton.cdiv(k, k_per_split)
    atomic = cfg.pop("ATOMIC", True)
    out, ws, cnt = splitk.outputs(x, m, n, split, atomic)
    if m == 0:
        return splitk.finish(out, x.dtype)
    args = (x, weight, scale, out, ws, cnt, m, n, k, k_per_split, split, x.stride(0), weight.stride(0),
            out.stride(-2), out.stride(0) if out.dim() == 3 else 0)
    consts = dict(cfg, SPLIT=split > 1, ATOMIC=atomic, IEEE=x.dtype == torch.float32)
    if warmup:
        _fp8_w8a16_kernel.warmup(*args, grid=(tiles, split), **consts)
        return None
    _fp8_w8a16_kernel[(tiles, split)](*args, **consts)
    return splitk.finish(out, x.dtype)
