"""The FP8 method's producer kernels: add + RMSNorm (Llama's rounding) and SwiGLU, each ending in FP8 quantization
per token for the linear layer that reads the result (quantization/fp8.py's norm_fp8 and swiglu_fp8 call these).
The norm has the arithmetic and bits of kernels/fused_norm.py's add_rms_norm_fp8; SwiGLU + FP8 runs as the split
(two-launch) form of kernels/silu_mul.py's silu_mul_fp8, which runs it from here, or, above 4,096 rows, as one launch
of whole rows per program (FP8_LAUNCH). Two differences that change no bit: every launch takes PDL (kernels/pdl.py;
SwiGLU's second launch follows its first), and with HW_CVT (kernels/fp8_quant.py) the e4m3 rounding is the hardware's
conversion (cvt.rn.satfinite) instead of ~15 float32 integer ops per element.

Why: the quantizing passes are bound by instructions, not bytes (bench/fp8_where.py round 2, H200: the SwiGLU
quantizing launch took 165 us at 8,192 rows against ~80 us of traffic), and a decode step's small launches wait
on each other. The interpreter's own fp8 downcast is inexact (ties round up; kernels/reshape_and_cache.py), so
HW_CVT stays off there and the software rounding runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import fp8_quant, pdl
from kernels.fp8_quant import quantize_row_fast, recip_ok, row_scale
from kernels.fused_norm import residual_prologue


@triton.jit
def _add_norm_fp8_kernel(
    x_ptr, residual_ptr, weight_ptr, q_ptr, s_ptr, xr_ptr, xc_ptr,
    stride_x, stride_r, stride_q, hidden, eps, ub,
    HAS_RESIDUAL: tl.constexpr, X_SCALED: tl.constexpr, HAS_UB: tl.constexpr, HW_CVT: tl.constexpr,
    BLOCK: tl.constexpr, PDL: tl.constexpr = False,  # kernels/pdl.py, as fused_norm's
    RECIP: tl.constexpr = False,  # kernels/fp8_quant.py's quantize_row_fast
):
    """One row: x (times its row and column scales when X_SCALED, rounded to the model dtype) + residual (stored
    back), RMSNorm in float32 cast to the model dtype, times the weight, then FP8 per token. The expression
    order is kernels/fused_norm.py's, operation for operation (the bits depend on it)."""
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = residual_prologue(x_ptr, residual_ptr, xr_ptr, xc_ptr, row, stride_x, stride_r, offs, mask,
                          HAS_RESIDUAL, X_SCALED)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / hidden
    normed = xf * tl.rsqrt(var + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = w * normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    y = tl.where(mask, y.to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)
    scale = row_scale(tl.max(tl.abs(y), axis=0), ub, HAS_UB)
    tl.store(s_ptr + row, scale)
    q = quantize_row_fast(y, scale, HW_CVT, RECIP)
    tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


NORM_LAUNCH: list = []
"""[(max rows, num_warps)]: the norm's warps by row count where measured faster with the same bits
(bench/fp8_where.py); rows past every bound, or none listed: fused_norm's choice (16 at hidden 4096)."""


def _norm_warps(m: int, block: int) -> int:
    return next((w for most, w in NORM_LAUNCH if m <= most and w), None) or min(16, max(1, block // 256))


def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     ub: float | None = None, x_scales=None, hw_cvt: bool | None = None,
                     num_warps: int | None = None, warmup: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels/fused_norm.py's add_rms_norm_fp8 (same arguments, same bits: float8_e4m3fn [T, hidden], float32
    scales [T, 1]; `residual` updated in place). `hw_cvt`: the hardware's e4m3 conversion (default:
    kernels/fp8_quant.py's HW_CVT, on CUDA); `num_warps`: NORM_LAUNCH's, else fused_norm's choice (the row's sum
    is reduced in the same order then). `warmup`: compile only (bench/fp8_where.py compiles its variants in
    parallel)."""
    hidden = x.shape[-1]
    if x.dim() != 2 or x.stride(-1) != 1 or weight.shape != (hidden,):
        raise ValueError(f"x must be [num_tokens, hidden] with a contiguous last dim and weight [hidden]; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1 or residual.dtype != x.dtype):
        raise ValueError("residual must match x in shape and dtype with a contiguous last dim")
    if x_scales is not None and (x_scales[0].numel() != x.shape[0] or x_scales[1].numel() != hidden
                                 or x_scales[0].dtype != torch.float32 or x_scales[1].dtype != torch.float32):
        raise ValueError(f"x_scales must be float32 [{x.shape[0]}] and [{hidden}] row and column scales")
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    if x.shape[0] == 0:
        return q, s
    block = triton.next_power_of_2(hidden)
    r = residual if residual is not None else x
    xr, xc = x_scales if x_scales is not None else (s, s)
    args = (x, r, weight, q, s, xr, xc, x.stride(0), r.stride(0), q.stride(0), hidden, eps,
            float(ub) if ub is not None else 0.0)
    hw = (fp8_quant.HW_CVT and x.is_cuda) if hw_cvt is None else hw_cvt
    consts = dict(HAS_RESIDUAL=residual is not None, X_SCALED=x_scales is not None, HAS_UB=ub is not None,
                  HW_CVT=hw, BLOCK=block, num_warps=num_warps or _norm_warps(x.shape[0], block),
                  RECIP=recip_ok(x.dtype, hw, ub is not None), **pdl.args(x))
    if warmup:
        _add_norm_fp8_kernel.warmup(*args, grid=(x.shape[0],), **consts)
    else:
        _add_norm_fp8_kernel[(x.shape[0],)](*args, **consts)
    return q, s


@triton.jit
def _swiglu_tile(gate_up_ptr, rs_ptr, col_ptr, rows, offs, r_ok, c_ok, inter, stride_in, SCALED: tl.constexpr):
    """A [ROWS, BLOCK] tile of silu(gate) * up in the 16-bit dtype, rounded as torch rounds it (kernels/silu_mul.py's
    _silu_mul_block arithmetic); with SCALED gate_up is an FP8 GEMM's output before its row and column scales,
    applied and rounded as the GEMM would have. The column scales are read once per tile, not once per row."""
    mask = r_ok[:, None] & c_ok[None, :]
    src = gate_up_ptr + rows.to(tl.int64)[:, None] * stride_in + offs[None, :]
    dt = gate_up_ptr.dtype.element_ty
    g = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(src + inter, mask=mask, other=0.0).to(tl.float32)
    if SCALED:
        rs = tl.load(rs_ptr + rows, mask=r_ok, other=0.0)[:, None]
        g = (g * rs * tl.load(col_ptr + offs, mask=c_ok, other=0.0)[None, :]).to(dt).to(tl.float32)
        u = (u * rs * tl.load(col_ptr + inter + offs, mask=c_ok, other=0.0)[None, :]).to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # torch rounds silu(g) before the product
    return (act * u).to(dt)


@triton.jit
def _silu_mul_amax_kernel(
    gate_up_ptr, y_ptr, part_ptr, rs_ptr, col_ptr, t, inter, nblk, stride_in,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, SCALED: tl.constexpr, PDL: tl.constexpr = False,
):
    """Split SwiGLU + FP8, first launch: a [ROWS, BLOCK] tile of _swiglu_tile to y, and each row's amax over the
    tile to part[row, block]."""
    pdl.enter(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    r_ok, c_ok = rows < t, offs < inter
    y = _swiglu_tile(gate_up_ptr, rs_ptr, col_ptr, rows, offs, r_ok, c_ok, inter, stride_in, SCALED)
    rows64 = rows.to(tl.int64)
    tl.store(y_ptr + rows64[:, None] * inter + offs[None, :], y, mask=r_ok[:, None] & c_ok[None, :])
    tl.store(part_ptr + rows64 * nblk + blk, tl.max(tl.abs(y.to(tl.float32)), axis=1), mask=r_ok)


@triton.jit
def _silu_mul_fp8_rows_kernel(
    gate_up_ptr, q_ptr, s_ptr, rs_ptr, col_ptr, t, inter, stride_in, ub,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, SCALED: tl.constexpr, HAS_UB: tl.constexpr, HW_CVT: tl.constexpr,
    PDL: tl.constexpr = False, RECIP: tl.constexpr = False,
):
    """SwiGLU + FP8 in one launch without waiting on other programs: each program holds ROWS whole rows (BLOCK, a
    power of two, covers the row) in registers, takes each row's amax and quantizes it there (the same
    _swiglu_tile arithmetic and quantize_row_cvt as the split launches, so the same bits: a row's max does not
    depend on the order it is taken in). No 16-bit scratch and no second launch; the column scales (SCALED) are
    read once per program, i.e. once per ROWS rows."""
    pdl.enter(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK)
    r_ok, c_ok = rows < t, offs < inter
    y = _swiglu_tile(gate_up_ptr, rs_ptr, col_ptr, rows, offs, r_ok, c_ok, inter, stride_in, SCALED).to(tl.float32)
    scale = row_scale(tl.max(tl.abs(y), axis=1), ub, HAS_UB)  # the masked columns are 0: they change no max
    q = quantize_row_fast(y, scale[:, None], HW_CVT, RECIP)
    rows64 = rows.to(tl.int64)
    tl.store(q_ptr + rows64[:, None] * inter + offs[None, :], q.to(q_ptr.dtype.element_ty),
             mask=r_ok[:, None] & c_ok[None, :])
    tl.store(s_ptr + rows, scale, mask=r_ok)


@triton.jit
def _piece(gate_up_ptr, rs_ptr, col_ptr, rows, r_ok, start, inter, stride_in, P: tl.constexpr, SCALED: tl.constexpr):
    """Columns start .. start + P of _swiglu_tile's rows, in float32, with their offsets and mask."""
    offs = start + tl.arange(0, P)
    c_ok = offs < inter
    y = _swiglu_tile(gate_up_ptr, rs_ptr, col_ptr, rows, offs, r_ok, c_ok, inter, stride_in, SCALED).to(tl.float32)
    return y, offs, r_ok[:, None] & c_ok[None, :]


@triton.jit
def _silu_mul_fp8_pieces_kernel(
    gate_up_ptr, q_ptr, s_ptr, rs_ptr, col_ptr, t, inter, stride_in, ub,
    ROWS: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, SCALED: tl.constexpr,
    HAS_UB: tl.constexpr, HW_CVT: tl.constexpr, PDL: tl.constexpr = False, RECIP: tl.constexpr = False,
):
    """_silu_mul_fp8_rows_kernel with the row held as three power-of-two pieces P0 + P1 + P2 (14,336 = 8,192 + 4,096
    + 2,048) instead of one block of next_power_of_2(inter) (16,384: 1/8 of its lanes masked, computing SwiGLU and
    the division on nothing). Same arithmetic per element, the row's max over the three pieces: the same bits."""
    pdl.enter(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = rows < t
    y0, o0, m0 = _piece(gate_up_ptr, rs_ptr, col_ptr, rows, r_ok, 0, inter, stride_in, P0, SCALED)
    y1, o1, m1 = _piece(gate_up_ptr, rs_ptr, col_ptr, rows, r_ok, P0, inter, stride_in, P1, SCALED)
    y2, o2, m2 = _piece(gate_up_ptr, rs_ptr, col_ptr, rows, r_ok, P0 + P1, inter, stride_in, P2, SCALED)
    amax = tl.maximum(tl.maximum(tl.max(tl.abs(y0), axis=1), tl.max(tl.abs(y1), axis=1)), tl.max(tl.abs(y2), axis=1))
    scale = row_scale(amax, ub, HAS_UB)
    qrow = q_ptr + rows.to(tl.int64)[:, None] * inter
    dt = q_ptr.dtype.element_ty
    tl.store(qrow + o0[None, :], quantize_row_fast(y0, scale[:, None], HW_CVT, RECIP).to(dt), mask=m0)
    tl.store(qrow + o1[None, :], quantize_row_fast(y1, scale[:, None], HW_CVT, RECIP).to(dt), mask=m1)
    tl.store(qrow + o2[None, :], quantize_row_fast(y2, scale[:, None], HW_CVT, RECIP).to(dt), mask=m2)
    tl.store(s_ptr + rows, scale, mask=r_ok)


def pieces_of(inter: int) -> tuple[int, int, int] | None:
    """inter as P0 + P1 + P2, powers of two, P0 >= P1 >= P2 >= 16, the last one possibly part-masked; None where
    that wastes more lanes than one power-of-two block would not (then the ROW kernel runs)."""
    p0 = 1 << (inter.bit_length() - 1)
    rest = inter - p0
    if rest < 32:
        return None
    p1 = 1 << (rest.bit_length() - 1)
    p2 = max(16, triton.next_power_of_2(max(rest - p1, 1)))
    return (p0, p1, p2) if p0 + p1 + p2 < triton.next_power_of_2(inter) else None


@triton.jit
def _quant_by_parts_kernel(
    y_ptr, part_ptr, q_ptr, s_ptr, t, inter, nblk, ub,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, NBLK: tl.constexpr, HAS_UB: tl.constexpr, HW_CVT: tl.constexpr,
    PDL: tl.constexpr = False, RECIP: tl.constexpr = False,
):
    """Split SwiGLU + FP8, second launch: each row's scale from its tiles' amaxes, then a [ROWS, BLOCK] tile of y
    quantized (quantize_row_cvt); column block 0 writes the scales."""
    pdl.enter(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    r_ok, c_ok = rows < t, offs < inter
    rows64 = rows.to(tl.int64)
    pb = tl.arange(0, NBLK)
    parts = tl.load(part_ptr + rows64[:, None] * nblk + pb[None, :], mask=r_ok[:, None] & (pb < nblk)[None, :],
                    other=0.0)
    scale = row_scale(tl.max(parts, axis=1), ub, HAS_UB)
    mask = r_ok[:, None] & c_ok[None, :]
    y = tl.load(y_ptr + rows64[:, None] * inter + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    q = quantize_row_fast(y, scale[:, None], HW_CVT, RECIP)
    tl.store(q_ptr + rows64[:, None] * inter + offs[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    if blk == 0:
        tl.store(s_ptr + rows, scale, mask=r_ok)


FP8_LAUNCH: list = [(64, {"ROWS": 1, "BLOCK": 1024, "num_warps": 4}),
                    (4096, {"ROWS": 4, "BLOCK": 512, "num_warps": 4}),
                    (1 << 30, {"ROWS": 1, "num_warps": 16, "ROW": True, "PIECES": True})]
"""[(max rows, config)], the first entry whose bound the row count does not pass (silu_mul_fp8 here and
kernels/silu_mul.py's pick by it): {"ROWS", "BLOCK", "num_warps"} (and optionally the quantizing launch's
"ROWS2", "BLOCK2", "warps2") for the split launches; {"ROWS", "num_warps", "ROW": True} for one launch of whole
rows (_silu_mul_fp8_rows_kernel; with "PIECES": True, _silu_mul_fp8_pieces_kernel); {"BLOCK", "num_warps"} for
silu_mul.py's one program per row. "RECIP": False keeps the correctly rounded division per element where
kernels/fp8_quant.py's RECIP_DIV would apply; "maxnreg" caps the registers. Whole rows at 8,192 rows, bench/fp8_div.py
round 2 (H200, each bit for bit the software reference first), us per call: one 16,384 block 228.9 (with the
reciprocal 235.5: 81 registers instead of 51, one program per SM instead of two), three pieces 246.1, three pieces
with the reciprocal **203.9** (8 warps 216.6, 32 warps 326.0).
Split tiles: bench/fp8_where.py round 1 (H200, Llama-3-8B's 14336, scales applied in the kernel; 13 launches, each
bit for bit first), us per call, against silu_mul.py's FP8_CONFIG (one program per row): 16 rows 5.5 vs 16.1, 64:
7.3 vs 16.6 (ROWS 1, BLOCK 1024); 256: 13.4 vs 20.4, 512: 25.2 vs 30.8, 2048: 83.5 vs 99.8, 8192: 307 vs 357
(ROWS 4, BLOCK 512); rounds 3 and 4 (hardware rounding) kept these tiles.
Whole rows (ROW): bench/fp8_step.py session 8 round 1 (H200, each config bit for bit the split's over 10 graph
replays first), us per call, split against the best ROW: 8,192 rows (unscaled: gate_up scales its own output
there) 268.9 vs 226.7 (1 row, 16 warps; 2 rows 308-337); 2,048 rows 71.8 vs 129.1 and 256 rows 11.3 vs 18.3 (with
the gate_up scales applied, every program reads all 28,672 column scales: ROW loses wherever they are deferred, up
to DEFER_MAX_M's 4,096 rows).
The ticket-and-wait one-launch kernel ("ONE", tiles that wait for their row group's amax) is gone. With session 7's
groups of 1-8 rows it lost at 256 rows (18-23 us: 1,792 programs take tickets from one counter and wait) and at
8,192 (244 us in session 7, 424 in session 8's round 1, against ROW's 227). With the decode batch's rows in one to
four groups (56-112 tiles of up to 256 rows that meet once; session 8 round 3) it took 30-205 us at 256 rows.
Its ~25% engine loss in session 7's round 2 was two Triton compiles inside the timed window, not the kernel
(docs/quantization.md)."""


def check_gate_up(gate_up, scales) -> None:
    """SwiGLU's input: [num_tokens, 2 * inter] (gate, then up) with a contiguous last dim; `scales` (row, column)
    float32 of its row and column counts (kernels/silu_mul.py checks its inputs by it too)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must be [num_tokens, 2 * inter] with a contiguous last dim; got "
                         f"{tuple(gate_up.shape)}")
    if scales is not None and (scales[0].numel() != gate_up.shape[0] or scales[1].numel() != gate_up.shape[1]
                               or scales[0].dtype != torch.float32 or scales[1].dtype != torch.float32):
        raise ValueError(f"scales must be float32 [{gate_up.shape[0]}] and [{gate_up.shape[1]}] row and column scales")


SPLIT_DEFAULT = {"ROWS": 4, "BLOCK": 512, "num_warps": 4}
"""The split launch where FP8_LAUNCH names a one-program-per-row launch (kernels/silu_mul.py's) for the row count."""


def silu_mul_fp8(gate_up: torch.Tensor, ub: float | None = None, scales=None, split: dict | None = None,
                 hw_cvt: bool | None = None, warmup: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU + FP8 per token, bit for bit quantize_fp8_rows(silu_mul(gate_up, scales), ub=ub), in two launches:
    SwiGLU over [ROWS, BLOCK] tiles to a 16-bit scratch with per-tile amaxes, then the quantizing launch (one
    program per row would leave most SMs idle at decode's row counts; the split pays a write and read of the
    16-bit result); or, with "ROW" in the config, in one launch of whole rows per program
    (_silu_mul_fp8_rows_kernel). `split`: the launch config (default
    FP8_LAUNCH's entry for the row count); `hw_cvt` as add_rms_norm_fp8's."""
    check_gate_up(gate_up, scales)
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    q = torch.empty((t, inter), dtype=torch.float8_e4m3fn, device=gate_up.device)
    s = torch.empty((t, 1), dtype=torch.float32, device=gate_up.device)
    if t == 0:
        return q, s
    cfg = split or next((c for most, c in FP8_LAUNCH if t <= most), SPLIT_DEFAULT)
    cfg = cfg if "ROWS" in cfg else SPLIT_DEFAULT
    rows, block, warps = cfg["ROWS"], cfg.get("BLOCK", 512), cfg.get("num_warps", 4)
    rows2, block2, warps2 = cfg.get("ROWS2", rows), cfg.get("BLOCK2", block), cfg.get("warps2", warps)
    nblk = triton.cdiv(inter, block)
    hw = (fp8_quant.HW_CVT and gate_up.is_cuda) if hw_cvt is None else hw_cvt
    recip = recip_ok(gate_up.dtype, hw, ub is not None) and cfg.get("RECIP", True)
    rs, cs = scales if scales is not None else (s, s)
    if cfg.get("ROW"):  # whole rows per program, one launch
        args = (gate_up, q, s, rs, cs, t, inter, gate_up.stride(0), float(ub) if ub is not None else 0.0)
        consts = dict(ROWS=rows, SCALED=scales is not None, HAS_UB=ub is not None, HW_CVT=hw, num_warps=warps,
                      RECIP=recip, **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}), **pdl.args(gate_up))
        pieces = pieces_of(inter) if cfg.get("PIECES") else None
        if pieces:
            kernel = _silu_mul_fp8_pieces_kernel
            consts.update(P0=pieces[0], P1=pieces[1], P2=pieces[2])
        else:
            kernel = _silu_mul_fp8_rows_kernel
            consts.update(BLOCK=triton.next_power_of_2(inter))
        grid = (triton.cdiv(t, rows),)
        if warmup:
            kernel.warmup(*args, grid=grid, **consts)
        else:
            kernel[grid](*args, **consts)
        return q, s
    y = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device)
    part = torch.empty((t, nblk), dtype=torch.float32, device=gate_up.device)
    grid1 = (triton.cdiv(t, rows), nblk)
    grid2 = (triton.cdiv(t, rows2), triton.cdiv(inter, block2))
    a1 = (gate_up, y, part, rs, cs, t, inter, nblk, gate_up.stride(0))
    c1 = dict(ROWS=rows, BLOCK=block, SCALED=scales is not None, num_warps=warps, **pdl.args(gate_up))
    a2 = (y, part, q, s, t, inter, nblk, float(ub) if ub is not None else 0.0)
    c2 = dict(ROWS=rows2, BLOCK=block2, NBLK=max(2, triton.next_power_of_2(nblk)), HAS_UB=ub is not None,
              HW_CVT=hw, num_warps=warps2, RECIP=recip, **pdl.args(gate_up))
    if warmup:
        _silu_mul_amax_kernel.warmup(*a1, grid=grid1, **c1)
        _quant_by_parts_kernel.warmup(*a2, grid=grid2, **c2)
    else:
        _silu_mul_amax_kernel[grid1](*a1, **c1)
        _quant_by_parts_kernel[grid2](*a2, **c2)
    return q, s
