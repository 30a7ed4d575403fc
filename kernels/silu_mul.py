"""SwiGLU activation: silu(gate) * up from the fused gate/up projection, in one pass; with FP8 quantization per
token (silu_mul_fp8) in one launch per row, or split over the row in two launches (kernels/fp8_fused.py's, with
the table of launches by row count, FP8_LAUNCH, that silu_mul_fp8 picks from)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import fp8_fused, pdl
from kernels.fp8_fused import FP8_LAUNCH, check_gate_up
from kernels.fp8_quant import quantize_row, row_scale


@triton.jit
def _silu_mul_block(gate_up_row, offs, mask, inter, dtype: tl.constexpr, rs, col_ptr, SCALED: tl.constexpr):
    """silu(gate) * up for one block of a row, rounded to `dtype` as torch rounds it, in float32. SCALED: the
    row is an FP8 GEMM's output before its scales (row scale rs, column scales at col_ptr), applied first and
    rounded to `dtype` as the GEMM would round them."""
    g = tl.load(gate_up_row + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_row + inter + offs, mask=mask, other=0.0).to(tl.float32)
    if SCALED:
        g = (g * rs * tl.load(col_ptr + offs, mask=mask, other=0.0)).to(dtype).to(tl.float32)
        u = (u * rs * tl.load(col_ptr + inter + offs, mask=mask, other=0.0)).to(dtype).to(tl.float32)
    # torch rounds silu(g) to the dtype before the product; do the same.
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    return (act * u).to(dtype).to(tl.float32)


@triton.jit
def _silu_mul_quant_kernel(
    gate_up_ptr, q_ptr, s_ptr, rs_ptr, col_ptr, stride_in, stride_q, inter, ub,
    BLOCK: tl.constexpr, HAS_UB: tl.constexpr, ONE_PASS: tl.constexpr, SCALED: tl.constexpr,
):
    """One program per token: silu(gate) * up in the 16-bit dtype, then FP8 per token (kernels/fp8_quant.py).
    ONE_PASS: the row fits one block; else a first pass finds the amax and a second recomputes and stores."""
    tok = tl.program_id(0).to(tl.int64)
    row = gate_up_ptr + tok * stride_in
    dt = gate_up_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    rs = tl.load(rs_ptr + tok) if SCALED else 1.0
    if ONE_PASS:
        y = _silu_mul_block(row, offs, offs < inter, inter, dt, rs, col_ptr, SCALED)
        scale = row_scale(tl.max(tl.abs(y), axis=0), ub, HAS_UB)
        tl.store(q_ptr + tok * stride_q + offs, quantize_row(y, scale).to(q_ptr.dtype.element_ty), mask=offs < inter)
    else:
        vmax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, inter, BLOCK):
            y = _silu_mul_block(row, k0 + offs, k0 + offs < inter, inter, dt, rs, col_ptr, SCALED)
            vmax = tl.maximum(vmax, tl.abs(y))
        scale = row_scale(tl.max(vmax, axis=0), ub, HAS_UB)
        for k0 in range(0, inter, BLOCK):
            y = _silu_mul_block(row, k0 + offs, k0 + offs < inter, inter, dt, rs, col_ptr, SCALED)
            tl.store(q_ptr + tok * stride_q + k0 + offs, quantize_row(y, scale).to(q_ptr.dtype.element_ty),
                     mask=k0 + offs < inter)
    tl.store(s_ptr + tok, scale)


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,  # [num_tokens, 2 * inter]: gate columns, then up columns
    out_ptr,  # [num_tokens, inter]
    rs_ptr,  # [num_tokens] float32 row scales (SCALED)
    col_ptr,  # [2 * inter] float32 column scales (SCALED)
    stride_in,
    stride_out,
    inter,
    BLOCK: tl.constexpr,
    SCALED: tl.constexpr,
    PDL: tl.constexpr = False,  # kernels/pdl.py
):
    pdl.enter(PDL)
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    rs = tl.load(rs_ptr + tok) if SCALED else 1.0
    y = _silu_mul_block(gate_up_ptr + tok * stride_in, offs, mask, inter, out_ptr.dtype.element_ty, rs, col_ptr,
                        SCALED)
    tl.store(out_ptr + tok * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, scales=None) -> torch.Tensor:
    """gate_up [num_tokens, 2 * inter] -> silu(gate) * up [num_tokens, inter]. `scales` (row [num_tokens],
    column [2 * inter], float32): gate_up is an FP8 GEMM's output before its scales, applied here first."""
    check_gate_up(gate_up, scales)
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device)
    if t == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    rs, cs = scales if scales is not None else (out, out)
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](gate_up, out, rs, cs, gate_up.stride(0), out.stride(0), inter,
                                                     BLOCK=block, SCALED=scales is not None, num_warps=4,
                                                     **pdl.args(gate_up))
    return out


MAX_ONE_PASS = 16384
"""Rows up to this many outputs are held in registers (Llama-3-8B's intermediate size is 14336)."""


FP8_CONFIG: dict = {"BLOCK": 1024, "num_warps": 4}
"""silu_mul_fp8's launch when the caller names none and FP8_LAUNCH has no entry for the row count: BLOCK (a power
of two; the two-pass loop below the row's width) and num_warps; empty: the whole row in one block.
bench/fp8.py round 2 (H200, Llama-3-8B's 14336, scales applied in the kernel): this one is fastest over the
fixed workload's steps (0.0199 ms at 256 rows, 0.360 at 8192; one block per row 0.0191 and 0.546)."""

def silu_mul_fp8(gate_up: torch.Tensor, ub: float | None = None, block: int | None = None, scales=None,
                 num_warps: int | None = None, warmup: bool = False,
                 split: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu_mul followed by FP8 quantization per token: (float8_e4m3fn [num_tokens, inter], float32 scales
    [num_tokens, 1]), bit for bit quantize_fp8_rows(silu_mul(gate_up, scales), ub=ub). One program per row, or
    with `split` ({"ROWS", "BLOCK", "num_warps"}; by default FP8_LAUNCH's entry for the row count) two launches over
    [ROWS, BLOCK] tiles (kernels/fp8_fused.py's silu_mul_fp8): SwiGLU to a 16-bit scratch with per-tile amaxes,
    then quantization. One program per
    row leaves most SMs idle at decode's row counts and reads the column scales once per row; the split pays
    a write and read of the 16-bit result (L2-resident at decode sizes). `block` below the row's width runs
    the one-program two-pass loop (else FP8_CONFIG's). `warmup`: compile only (bench/fp8.py)."""
    check_gate_up(gate_up, scales)
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if split is None and block is None and num_warps is None:
        cfg = next((c for most, c in FP8_LAUNCH if t <= most), FP8_CONFIG)
        if "ROWS" in cfg:
            split = cfg
        else:
            block, num_warps = cfg.get("BLOCK"), cfg.get("num_warps")
    if split is not None:  # the split launches live with the FP8 method's producers
        return fp8_fused.silu_mul_fp8(gate_up, ub, scales=scales, split=split, warmup=warmup)
    q = torch.empty((t, inter), dtype=torch.float8_e4m3fn, device=gate_up.device)
    s = torch.empty((t, 1), dtype=torch.float32, device=gate_up.device)
    if t == 0:
        return q, s
    if block is None:
        block, num_warps = FP8_CONFIG.get("BLOCK"), num_warps or FP8_CONFIG.get("num_warps")
    one_pass = (block is None or block >= inter) and inter <= MAX_ONE_PASS
    blk = triton.next_power_of_2(inter) if one_pass else (block or 4096)
    warps = num_warps or (16 if blk >= 8192 else 8 if blk >= 2048 else 4)
    rs, cs = scales if scales is not None else (s, s)
    args = (gate_up, q, s, rs, cs, gate_up.stride(0), q.stride(0), inter, float(ub) if ub is not None else 0.0)
    consts = dict(BLOCK=blk, HAS_UB=ub is not None, ONE_PASS=one_pass, SCALED=scales is not None, num_warps=warps)
    if warmup:
        _silu_mul_quant_kernel.warmup(*args, grid=(t,), **consts)
    else:
        _silu_mul_quant_kernel[(t,)](*args, **consts)
    return q, s


def silu_mul_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
