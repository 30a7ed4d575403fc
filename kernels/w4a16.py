"""W4A16 GEMM: y = x @ dequant(qweight), 4-bit weights unpacked in registers, with a split-K path for the
small batches of decode (the GPU is filled by cutting K when M x N gives too few tiles).

Layout (services/engine/model/quantization/int4.py makes it from GPTQ, AWQ and compressed-tensors):
input row k of column n is bits 4*(k % 8) .. +3 of qweight[k // 8, n]; its group is k // group_size and
w[k, n] = (q - zeros[g, n]) * scales[g, n]. With act-order the rows were sorted by group at load and
`perm[k]` is the column of x that row k multiplies. Host-side work is shape checks and one allocation,
so a call can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _w4a16_kernel(
    x_ptr,  # [M, K] activations, unit stride along K
    qw_ptr,  # [ceil(K / 8), N] int32, unit stride along N
    s_ptr,  # [G, N] scales
    z_ptr,  # [G, N] uint8 zero points, same strides as scales
    perm_ptr,  # [K] int32 (read when HAS_PERM)
    out_ptr,  # [SPLIT_K, M, N] float32 partial sums, or [M, N] in x's dtype when SPLIT_K == 1
    M, N, K, group_size, k_per_split,
    stride_xm, stride_qk, stride_sg, stride_om, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_PERM: tl.constexpr, SCALE_PER_TILE: tl.constexpr, IEEE: tl.constexpr,
):
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        cols = tl.load(perm_ptr + offs_k, mask=k_mask, other=0) if HAS_PERM else offs_k
        a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + cols[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # Each word holds eight consecutive rows: load BLOCK_K / 8 words per column once, then spread them
        # into rows in registers (row 8p + i = bits 4i of word p). Rows past K multiply x's zero columns.
        offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        packed = tl.load(qw_ptr + offs_w[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                         mask=(offs_w < tl.cdiv(k_end, 8))[:, None] & n_mask[None, :], other=0)
        shifts = tl.arange(0, 8) * 4
        q = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
        kn_mask = k_mask[:, None] & n_mask[None, :]
        if SCALE_PER_TILE:  # the tile lies inside one group: one row of scales and zeros
            g = k0 // group_size
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0)[None, :]
            z = tl.load(z_ptr + g * stride_sg + offs_n, mask=n_mask, other=0)[None, :]
        else:  # groups change inside the tile (small or odd group sizes): a group per row
            g = offs_k // group_size
            s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=kn_mask, other=0.0)
            z = tl.load(z_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=kn_mask, other=0)
        w = ((q - z.to(tl.int32)).to(tl.float32) * s.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    ptrs = out_ptr + pid_k * stride_os + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> dict:
    """Tile sizes by batch size, and split-K when the M x N tiles would leave most SMs idle (decode)."""
    if m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    if 16 <= group_size < cfg["BLOCK_K"] and group_size & (group_size - 1) == 0:
        cfg["BLOCK_K"] = group_size  # keep a tile inside one group: one scale row per tile
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    sms, split = _sm_count(device), 1
    while split < 16 and tiles * split * 2 <= 2 * sms and k // (split * 2) >= 4 * cfg["BLOCK_K"]:
        split *= 2
    cfg["SPLIT_K"] = split
    return cfg


def w4a16(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
          perm: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) -> [M, N] in x's dtype. `config` overrides `pick_config` (tests)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    m, k = x.shape
    n = qweight.shape[1]
    g = scales.shape[0]
    if qweight.dtype != torch.int32 or qweight.shape[0] != -(-k // 8):
        raise ValueError(f"qweight must be int32 [ceil(K/8), N] = [{-(-k // 8)}, N], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    if tuple(zeros.shape) != (g, n) or scales.shape[1] != n or g != -(-k // group_size):
        raise ValueError(f"scales and zeros must be [ceil(K/group_size), N] = [{-(-k // group_size)}, {n}], got "
                         f"{tuple(scales.shape)} and {tuple(zeros.shape)}")
    if perm is not None and (perm.shape != (k,) or perm.dtype != torch.int32):
        raise ValueError(f"perm must be int32 [K] = [{k}], got {perm.dtype} {tuple(perm.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    cfg = dict(config or pick_config(m, n, k, group_size, x.device))
    split = cfg.pop("SPLIT_K", 1)
    k_per_split = triton.cdiv(triton.cdiv(k, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = triton.cdiv(k, k_per_split)
    out = torch.empty((split, m, n) if split > 1 else (m, n), dtype=torch.float32 if split > 1 else x.dtype,
                      device=x.device)
    if m == 0:
        return out if split == 1 else out.sum(0).to(x.dtype)
    per_tile = group_size % cfg["BLOCK_K"] == 0  # tiles start at multiples of BLOCK_K
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
    _w4a16_kernel[grid](
        x, qweight, scales, zeros, perm if perm is not None else qweight,
        out, m, n, k, group_size, k_per_split,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(-2), out.stride(0) if split > 1 else 0,
        HAS_PERM=perm is not None, SCALE_PER_TILE=per_tile, IEEE=x.dtype == torch.float32, **cfg)
    return out if split == 1 else out.sum(0).to(x.dtype)


def unpack_int4_rows(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """[ceil(K/8), N] int32 -> [K, N] int32 values 0..15."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    return ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])[:k]


def dequantize_int4(qweight, scales, zeros, group_size: int, k: int) -> torch.Tensor:
    """The float32 [K, N] matrix the kernel multiplies by (rows in sorted order when act-order)."""
    g = torch.arange(k, device=qweight.device) // group_size
    return (unpack_int4_rows(qweight, k) - zeros[g].to(torch.int32)).float() * scales[g].float()


def w4a16_reference(x, qweight, scales, zeros, group_size: int, perm=None) -> torch.Tensor:
    """Dequantize, then matmul in x's dtype: the CPU path and the kernel tests' reference."""
    w = dequantize_int4(qweight, scales, zeros, group_size, x.shape[-1])
    xs = x[:, perm.long()] if perm is not None else x
    return xs @ w.to(x.dtype)
