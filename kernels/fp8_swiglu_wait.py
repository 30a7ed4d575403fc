"""SwiGLU + FP8 per token in ONE launch at decode's row counts, without the split's 16-bit round trip: each program
computes a [ROWS, BLOCK] tile of silu(gate) * up (kernels/fp8_swiglu_tile.py's `_swiglu_tile`), writes the tile's row amaxes,
then waits for the other column blocks of its row group (an arrival count per row group), takes each row's scale
from all of the group's amaxes and quantizes the tile it still holds in registers. The same bits as the split launches
(a row's max does not depend on the order it is taken in; the per-element arithmetic is theirs).

Why: in a decode layer at 256 rows the split's two launches take 13.6 us against bf16 SwiGLU's 5.8 (session 9 round
1, in a CUDA graph): the second launch (5.8 us) reads back the 16-bit result the first wrote. Session 7's and 8's
one-launch forms lost (18-205 us): their tiles took tickets from one counter, or their row groups were too large for
the SMs to hold at once. Here the grid is the split's (a program per tile, no tickets), the wait is per row group,
and the whole grid must fit on the GPU at once (`fits`: SMs x the compiled kernel's occupancy by registers, threads
and shared memory), else the split runs.

The wait (`group_wait`): per row group [count, generation] int32 words, zero at allocation (`reserve`, before any
CUDA graph capture). A program reads the generation, arrives (acq_rel add on count); the last to arrive resets the
count and bumps the generation (release); the others spin (acquire reads) until it changes. Nothing needs resetting
between calls or graph replays. The kernel waits for the previous one (PDL) but does not let the next one launch
early (`griddepcontrol.launch_dependents` is not called): a dependent grid taking SM room while this one waits on
itself could keep part of it from starting. The spin is bounded (SPIN_MAX reads): past it the program sets the error
word (`errors`) and goes on, so a grid that could not all be resident gives wrong values and a flag, not a hung GPU.

PHASE: 0 the one launch (CUDA); 1 then 2, two launches with a 16-bit scratch between them (the interpreter, which
runs programs one after another: a spin-wait would never end there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from kernels import fp8_quant, pdl
from kernels.fp8_swiglu_tile import _swiglu_tile, check_gate_up
from kernels.fp8_quant import quantize_row_cvt, row_scale

SPIN_MAX = 1 << 22
"""Reads of a row group's generation before a program gives up (each an L2 round trip: seconds in all)."""

MAX_GROUPS = 4096
"""Row groups the per-device wait words cover (rows up to MAX_GROUPS x ROWS take this kernel; more: the split)."""


@triton.jit
def group_wait(words_ptr, err_ptr, arrivals, spin_max):
    """Waits until `arrivals` programs have arrived at words_ptr ([count, generation]); their earlier global writes are
    visible to all after it (release on arrival, acquire on leaving)."""
    tl.debug_barrier()  # this program's threads have issued their writes before the release below
    gen = tl.atomic_add(words_ptr + 1, 0, sem="acquire")  # read before arriving: the bump comes after every arrival
    arrived = tl.atomic_add(words_ptr, 1, sem="acq_rel")
    if arrived == arrivals - 1:
        tl.atomic_xchg(words_ptr, 0, sem="relaxed")
        tl.atomic_add(words_ptr + 1, 1, sem="release")  # orders the reset before the next call's arrivals
    else:
        cur = gen
        spins = 0
        while (cur == gen) & (spins < spin_max):
            cur = tl.atomic_add(words_ptr + 1, 0, sem="acquire")
            spins += 1
        if cur == gen:
            tl.atomic_or(err_ptr, 1, sem="relaxed")  # gave up: the grid was not all resident
    tl.debug_barrier()


@triton.jit
def _silu_mul_fp8_wait_kernel(
    gate_up_ptr, y_ptr, part_ptr, words_ptr, q_ptr, s_ptr, rs_ptr, col_ptr, t, inter, nblk, stride_in, ub, spin_max,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, NBLK: tl.constexpr, SCALED: tl.constexpr,
    HAS_UB: tl.constexpr, HW_CVT: tl.constexpr, PHASE: tl.constexpr, PDL: tl.constexpr = False,
):
    """A [ROWS, BLOCK] tile in CHUNK-column steps (few registers, so that many programs fit at once): SwiGLU to the
    16-bit scratch y and the tile's row amaxes to part[row, blk]; the row group's wait; then each row's scale from
    the group's amaxes and the tile quantized from y (L2: this program wrote it just before)."""
    if PDL:
        gdc_wait()  # no launch_dependents: see the module's docstring
    grp = tl.program_id(0)
    blk = tl.program_id(1)
    rows = grp * ROWS + tl.arange(0, ROWS)
    r_ok = rows < t
    rows64 = rows.to(tl.int64)
    if PHASE != 2:
        amax = tl.zeros((ROWS,), dtype=tl.float32)
        for c in tl.static_range(BLOCK // CHUNK):
            offs = blk * BLOCK + c * CHUNK + tl.arange(0, CHUNK)
            c_ok = offs < inter
            y16 = _swiglu_tile(gate_up_ptr, rs_ptr, col_ptr, rows, offs, r_ok, c_ok, inter, stride_in, SCALED)
            tl.store(y_ptr + rows64[:, None] * inter + offs[None, :], y16, mask=r_ok[:, None] & c_ok[None, :])
            amax = tl.maximum(amax, tl.max(tl.abs(y16.to(tl.float32)), axis=1))
        tl.store(part_ptr + rows64 * nblk + blk, amax, mask=r_ok)
    if PHASE != 1:
        if PHASE == 0:
            group_wait(words_ptr + 1 + 2 * grp, words_ptr, nblk, spin_max)
        pb = tl.arange(0, NBLK)
        parts = tl.load(part_ptr + rows64[:, None] * nblk + pb[None, :], mask=r_ok[:, None] & (pb < nblk)[None, :],
                        other=0.0, cache_modifier=".cg")  # written by other programs of this launch: not from L1
        scale = row_scale(tl.max(parts, axis=1), ub, HAS_UB)
        for c in tl.static_range(BLOCK // CHUNK):
            offs = blk * BLOCK + c * CHUNK + tl.arange(0, CHUNK)
            mask = r_ok[:, None] & (offs < inter)[None, :]
            y = tl.load(y_ptr + rows64[:, None] * inter + offs[None, :], mask=mask, other=0.0,
                        cache_modifier=".cg").to(tl.float32)
            q = quantize_row_cvt(y, scale[:, None], HW_CVT)
            tl.store(q_ptr + rows64[:, None] * inter + offs[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        if blk == 0:
            tl.store(s_ptr + rows, scale, mask=r_ok)


_WORDS: dict = {}


def reserve(device: torch.device) -> torch.Tensor:
    """The device's wait words [error, (count, generation) x MAX_GROUPS], made once, zeroed (before any capture)."""
    device = torch.device(device)
    if device not in _WORDS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the SwiGLU wait words must be made before CUDA graph capture (fp8_swiglu_wait.reserve)")
        _WORDS[device] = torch.zeros(1 + 2 * MAX_GROUPS, dtype=torch.int32, device=device)
    return _WORDS[device]


def errors(device: torch.device) -> int:
    """Nonzero when a program gave up waiting since the last `clear_errors` (its grid was not all resident)."""
    return int(reserve(device)[0].item())


def clear_errors(device: torch.device) -> None:
    reserve(device)[0].zero_()


_FITS: dict = {}
"""(device index, constexprs) -> programs that fit on the GPU at once (compiled once, outside any capture)."""


def _occupancy(compiled, num_warps: int) -> int:
    """Programs of this compiled kernel one SM holds at once (registers in 256-register warp units, threads,
    shared memory)."""
    init = getattr(compiled, "_init_handles", None)  # loads the module, which fills n_regs
    if init is not None:
        init()
    regs = max(1, int(getattr(compiled, "n_regs", 0) or 255))
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (65536 // per_warp) // num_warps
    by_threads = 2048 // (32 * num_warps)
    shared = int(getattr(getattr(compiled, "metadata", None), "shared", 0) or 0)
    by_shared = 32 if shared == 0 else (227 * 1024) // shared
    return max(0, min(32, by_regs, by_threads, by_shared))


def _launch(gate_up, q, s, scales, ub, cfg, hw, phase, y, part, warmup=False):
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    rows, block, warps = cfg["ROWS"], cfg["BLOCK"], cfg.get("num_warps", 4)
    nblk = triton.cdiv(inter, block)
    words = reserve(gate_up.device)
    rs, cs = scales if scales is not None else (s, s)
    grid = (triton.cdiv(t, rows), nblk)
    args = (gate_up, y, part, words, q, s, rs, cs, t, inter, nblk, gate_up.stride(0),
            float(ub) if ub is not None else 0.0, SPIN_MAX)
    consts = dict(ROWS=rows, BLOCK=block, CHUNK=min(cfg.get("CHUNK", 512), block),
                  NBLK=max(2, triton.next_power_of_2(nblk)), SCALED=scales is not None, HAS_UB=ub is not None,
                  HW_CVT=hw, PHASE=phase, num_warps=warps)
    if phase == 0 and gate_up.is_cuda:
        consts.update(pdl.args(gate_up))
    if warmup:
        return _silu_mul_fp8_wait_kernel.warmup(*args, grid=grid, **consts)
    _silu_mul_fp8_wait_kernel[grid](*args, **consts)
    return None


def fits(gate_up: torch.Tensor, scales, ub, cfg: dict) -> bool:
    """Whether this launch's whole grid is resident at once on the GPU (else the caller runs the split); compiles the
    kernel the first time for these constexprs."""
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    groups = triton.cdiv(t, cfg["ROWS"])
    if groups > MAX_GROUPS:
        return False
    if not gate_up.is_cuda:
        return True
    index = gate_up.device.index if gate_up.device.index is not None else torch.cuda.current_device()
    key = (index, cfg["ROWS"], cfg["BLOCK"], cfg.get("CHUNK", 512), cfg.get("num_warps", 4), scales is not None,
           ub is not None, inter)
    if key not in _FITS:  # the build this call will run (same constexprs and argument specializations)
        q, s, y, part = _buffers(gate_up, cfg)
        compiled = _launch(gate_up, q, s, scales, ub, cfg, fp8_quant.HW_CVT, 0, y, part, warmup=True)
        sms = torch.cuda.get_device_properties(index).multi_processor_count
        _FITS[key] = sms * _occupancy(compiled, cfg.get("num_warps", 4))
    return groups * triton.cdiv(inter, cfg["BLOCK"]) <= _FITS[key]


def _buffers(gate_up: torch.Tensor, cfg: dict):
    """q (FP8), s (scales), y (16-bit scratch) and part (tile amaxes) for a call."""
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    dev = gate_up.device
    return (torch.empty((t, inter), dtype=torch.float8_e4m3fn, device=dev),
            torch.empty((t, 1), dtype=torch.float32, device=dev),
            torch.empty((t, inter), dtype=gate_up.dtype, device=dev),
            torch.empty((t, triton.cdiv(inter, cfg["BLOCK"])), dtype=torch.float32, device=dev))


def silu_mul_fp8_wait(gate_up: torch.Tensor, ub: float | None, scales, cfg: dict, hw_cvt: bool | None = None,
                      phases: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels/fp8_fused.py's silu_mul_fp8 (same arguments and bits) in one launch (`phases` 1, CUDA) or, where the
    interpreter runs it (`phases` 2), two. The caller checked `fits`. cfg: {"ROWS", "BLOCK", "CHUNK", "num_warps"}."""
    check_gate_up(gate_up, scales)
    phases = phases or (1 if gate_up.is_cuda else 2)
    if phases == 1 and not gate_up.is_cuda:
        raise ValueError("phases=1 (a spin-wait across programs) needs CUDA: the interpreter runs programs one by one")
    q, s, y, part = _buffers(gate_up, cfg)
    if gate_up.shape[0] == 0:
        return q, s
    hw = (fp8_quant.HW_CVT and gate_up.is_cuda) if hw_cvt is None else hw_cvt
    for phase in ((0,) if phases == 1 else (1, 2)):
        _launch(gate_up, q, s, scales, ub, cfg, hw, phase, y, part)
    return q, s
