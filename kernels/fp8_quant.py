"""FP8 (e4m3) activation quantization in one launch: per token, amax -> scale = amax / 448 (bounded above by
an optional `ub` and below by 1e-12), q = x / scale clamped to +-448 and rounded to nearest even; or one
static scale for all tokens. Bit for bit the torch reference in services/engine/model/quantization/fp8.py
(`quantize_activation`), which took ~6 eager launches per linear layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.reshape_and_cache import _quantize_e4m3

FP8_MAX = 448.0


@triton.jit
def row_scale(amax, ub, HAS_UB: tl.constexpr):
    """A row's dynamic scale: amax (bounded by ub) / 448, correctly rounded, at least 1e-12."""
    if HAS_UB:
        amax = tl.minimum(amax, ub)
    return tl.maximum(tl.math.div_rn(amax, 448.0), 1e-12)  # FP8_MAX: a jit function reads no plain globals


@triton.jit
def quantize_row(y, scale):
    """y / scale (correctly rounded) as exact e4m3 values in float32, ready for the cast to float8."""
    return _quantize_e4m3(tl.math.div_rn(y, scale), 1.0)


@triton.jit
def quantize_row_cvt(y, scale, HW_CVT: tl.constexpr):
    """y / scale (correctly rounded), clamped to +-448: with HW_CVT the caller's cast to float8 rounds to nearest
    even (the hardware's satfinite conversion); else rounded here to exact e4m3 values (quantize_row). HW_CVT is
    off under the interpreter, whose fp8 downcast is inexact (kernels/reshape_and_cache.py)."""
    if HW_CVT:
        return tl.minimum(tl.maximum(tl.math.div_rn(y, scale), -448.0), 448.0)
    return quantize_row(y, scale)


@triton.jit
def quantize_row_fast(y, scale, HW_CVT: tl.constexpr, RECIP: tl.constexpr):
    """quantize_row_cvt(y, scale, HW_CVT); with RECIP (the host allows it only where recip_ok() says so) y / scale is
    taken as |y| times the row's correctly rounded reciprocal r plus one remainder correction, fma(fma(-q0, scale,
    |y|), r, q0) with q0 = |y| r, and y's sign: one per-row division and three per-element ops in place of a
    correctly rounded division per element (div.rn: a reciprocal on the special-function unit and ~8 more
    instructions). Markstein's correction; the result can differ from div_rn only in float32 values below e4m3's
    smallest subnormal / 4, which the e4m3 conversion makes zero either way (the sign is y's in both): checked for
    every 16-bit y and every 16-bit amax (bfloat16 and float16; scale = row_scale(amax) without a bound), bit for
    bit in e4m3, by bench/fp8_div.py on the GPU and an exhaustive C run (docs/quantization.md)."""
    if RECIP:
        r = tl.math.div_rn(1.0, scale)
        a = tl.abs(y)
        q0 = a * r
        q = tl.minimum(tl.fma(tl.fma(-q0, scale, a), r, q0), 448.0)
        sign = y.to(tl.uint32, bitcast=True) & 0x80000000
        return ((q.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) | sign).to(tl.float32, bitcast=True)
    return quantize_row_cvt(y, scale, HW_CVT)


RECIP_DIV = True
"""Whether the GPU quantizing passes divide by the row's reciprocal with a remainder correction
(quantize_row_fast) where recip_ok allows it: the same e4m3 bits. bench/fp8_div.py round 1 (H200, session 10): 0
e4m3 mismatches over all 1,065,402,238 bfloat16 and 1,007,713,278 float16 (y, amax) pairs (44,554 / 46,108 with the
plain product |y| * r, no correction); every launch bit for bit the software reference; us per call at 256 / 8,192
rows, division -> reciprocal: o's input quantization 3.9 -> 2.6 / 39.2 -> 33.7, add + RMSNorm + FP8 3.8 -> 3.7 /
64.1 -> 61.3, the split SwiGLU + FP8 12.2 -> 11.9 at 256; the whole-row SwiGLU at 8,192 lost (229.2 -> 235.5: its
FP8_LAUNCH entry keeps the division). The fixed workload: 21,218 against 21,063 tok/s (bf16 15,143: 1.401x against
1.391x; the division engine ran third)."""


def recip_ok(dtype: torch.dtype, hw_cvt: bool, bounded: bool) -> bool:
    """quantize_row_fast's RECIP for a pass over `dtype` values: only 16-bit inputs (every value and amax a
    bfloat16 / float16 number: the domain the exhaustive check covers), a dynamic scale without an amax bound (the
    scale is then row_scale(amax) of such a number), on the GPU's conversion path (HW_CVT: the interpreter's fma
    rounds twice)."""
    return RECIP_DIV and hw_cvt and not bounded and dtype in (torch.bfloat16, torch.float16)


@triton.jit
def quantize_row_when_last(src_row_ptr, q_row_ptr, s_ptr, count_ptr, width, arrivals, ub,
                           BLOCK: tl.constexpr, HAS_UB: tl.constexpr, HW_CVT: tl.constexpr):
    """For a kernel whose `arrivals` programs each write a part of one 16-bit row (src_row_ptr, `width` contiguous
    values): each counts itself in at count_ptr (int32, zero before the first), and the last one reads the whole
    row back and quantizes it per token as _quant_rows_kernel does (same bits) to q_row_ptr and s_ptr, then sets
    the count back to zero for the next launch. The barrier and the acq_rel atomic order every thread's stores of
    a part before the count (CUTLASS's semaphore: bar.sync, then one thread's release)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if arrived == arrivals - 1:
        offs = tl.arange(0, BLOCK)
        mask = offs < width
        y = tl.load(src_row_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        scale = row_scale(tl.max(tl.abs(y), axis=0), ub, HAS_UB)
        tl.store(s_ptr, scale)
        q = quantize_row_cvt(y, scale, HW_CVT)
        tl.store(q_row_ptr + offs, q.to(q_row_ptr.dtype.element_ty), mask=mask)
        tl.atomic_xchg(count_ptr, 0, sem="relaxed")


_ZEROED: dict = {}


def zeroed(device: torch.device, n: int, name: str) -> torch.Tensor:
    """int32 zeros [>= n] on the device, one buffer per `name`, for kernels that count or combine across their
    programs and leave it zero again at their end (quantize_row_when_last). A larger request allocates a new
    buffer and keeps the old one alive: a captured CUDA graph may still use it."""
    have = _ZEROED.get((device, name))
    if have is None or have[-1].numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _ZEROED[(device, name)] = (have or []) + [buf]
    return _ZEROED[(device, name)][-1]


def arrival_counts(device: torch.device, n: int) -> torch.Tensor:
    """quantize_row_when_last's counts for the decode attention kernel (kernels/paged_decode.py)."""
    return zeroed(device, n, "decode_rows")


@triton.jit
def _quant_rows_kernel(
    x_ptr, q_ptr, s_ptr, static_ptr, K, stride_xm, stride_qm, ub,
    BLOCK_K: tl.constexpr, STATIC: tl.constexpr, HAS_UB: tl.constexpr, ONE_PASS: tl.constexpr,
    HW_CVT: tl.constexpr = False, PDL: tl.constexpr = False,  # kernels/pdl.py
    RECIP: tl.constexpr = False,  # quantize_row_fast's
):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row, q_row = x_ptr + row * stride_xm, q_ptr + row * stride_qm
    if ONE_PASS:  # the whole row fits one block: read x once
        xk = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        if ONE_PASS:
            amax = tl.max(tl.abs(xk), axis=0)
        else:
            vmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                vmax = tl.maximum(vmax, tl.abs(v))
            amax = tl.max(vmax, axis=0)
        scale = row_scale(amax, ub, HAS_UB)
    tl.store(s_ptr + row, scale)
    if ONE_PASS:
        q = quantize_row_fast(xk, scale, HW_CVT, RECIP)
        tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            q = quantize_row_fast(v, scale, HW_CVT, RECIP)
            tl.store(q_row + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=k0 + offs < K)


HW_CVT = True
"""Whether the GPU's FP8 quantization (this file's, kernels/fp8_fused.py's) rounds by the hardware's e4m3
conversion (quantize_row_cvt) rather than in float32 integer ops: the same bits (bench/fp8_where.py checks them
on the GPU before timing, and turns this off where they differ). Round 3 (H200): bits equal in every launch;
per call at 256 / 8,192 rows, norm 4.9 -> 4.5 / 75.4 -> 65.4 us, SwiGLU 12.0 -> 10.7 / 306 -> 272 us,
activation quantization 3.6 -> 3.2 / 41.2 -> 30.7 us."""

MAX_ONE_PASS = 16384
"""Rows up to this many features are held in registers (Llama-3-8B's widest input is 14336)."""


def quantize_fp8_rows(x: torch.Tensor, static_scale: torch.Tensor | None = None, ub: float | None = None,
                      block_k: int | None = None, hw_cvt: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 scales [M, 1]): dynamic per token, or `static_scale` (one
    float32 element) for every token. `block_k` forces the two-pass loop (tests). `hw_cvt`: round by the
    hardware's e4m3 conversion (the same bits; default HW_CVT on CUDA, never under the interpreter)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if static_scale is not None and static_scale.numel() != 1:
        raise ValueError(f"static_scale must hold one element, got {tuple(static_scale.shape)}")
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)  # the static scale is written per row too
    if m == 0:
        return q, s
    one_pass = block_k is None and k <= MAX_ONE_PASS
    hw = (HW_CVT and x.is_cuda) if hw_cvt is None else hw_cvt
    block = triton.next_power_of_2(k) if one_pass else (block_k or 4096)
    _quant_rows_kernel[(m,)](
        x, q, s, static_scale if static_scale is not None else s, k, x.stride(0), q.stride(0),
        float(ub) if ub is not None else 0.0,
        BLOCK_K=block, STATIC=static_scale is not None, HAS_UB=ub is not None, ONE_PASS=one_pass,
        HW_CVT=hw, RECIP=recip_ok(x.dtype, hw, static_scale is not None or ub is not None),
        num_warps=8 if block >= 4096 else 4, **pdl.args(x))
    return q, s
