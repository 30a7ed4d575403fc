"""The batch-1 W4A16 MLP in one persistent launch: gate/up GEMV -> silu(gate) * up -> down GEMV, with a grid-wide
barrier between the two GEMVs, so the weight stream does not stop at a launch boundary.

Why (docs/quantization.md, session 8): each batch-1 GEMV runs at 77-85% of the rate of a read-only kernel over the
same bytes because every launch pays its ramp (the first tiles have nothing to overlap) and its tail (a grid ends
part-idle). Here one grid of at most one wave of co-resident programs streams gate/up's tiles as `gemv4` does
(kernels/w4a16_stream.py: equal contiguous runs of tiles across column strips, the next tile in flight), the
program completing a strip writes silu(gate) * up to `act` (the gated epilogue, `strip_done`), then each program
loads its FIRST down tile (weights depend on nothing) and only then waits at the grid barrier that makes all of
`act` visible; then it streams down's tiles, reading x (= act) from L2 (`.cg`: another program wrote it in this
launch and L1 is not coherent).

The barrier (`grid_barrier`): [count, generation, error] int32 per device, zero at allocation. Each program reads
the generation, arrives (acq_rel add on count); the last to arrive resets count and bumps the generation (release);
the others spin (acquire reads) until the generation changes. Nothing needs resetting between calls or CUDA graph
replays. The spin is bounded (`SPIN_MAX` reads): past it the program sets the error word and goes on, so a grid
that was not co-resident gives wrong values and a flag (`errors`) rather than a hung GPU. The grid is at most
SMs x the occupancy of the compiled kernel (its registers, warps and shared memory), so all programs are resident.

PHASE: 0 both GEMVs with the barrier (CUDA); 1 gate/up only, 2 down only: two launches with the launch boundary as
the barrier (the interpreter, which runs programs one after another, so a spin-wait would never end there; and the
GPU A/B of barrier against launch boundary). The arithmetic per tile is gemv4's (`tile_sums`, `tile_sums_h2`);
group sizes, act-order, odd K and N as there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels import pdl as pdl_launch
from kernels import splitk
from kernels.w4a16_half2 import tile_sums_h2
from kernels.w4a16_stream import group_words, half2_mode, prefetch_tile, strip_cols, strip_done, tile_sums

SPIN_MAX = 1 << 22
"""Barrier reads before a program gives up (each an L2 round trip, ~0.5-1 us: seconds, far past any real wait)."""

DEFAULT = dict(T_A=8, BN_A=512, T_B=8, BN_B=256, num_warps=4, PER_SM=2, H2=2, L2_B=0)
"""Launch config where TUNED has none."""

TUNED: dict[tuple[int, int], dict] = {}
"""(hidden, inter) -> the launch config measured fastest (bench/w4a16_mlp.py's sweep on an H200)."""


def config_for(hidden: int, inter: int) -> dict:
    return dict(TUNED.get((hidden, inter), DEFAULT))


@triton.jit
def grid_barrier(bar_ptr, nprog, spin_max):
    """Every program of the grid waits here until all `nprog` have arrived; their earlier global writes are visible
    to all after it (release on arrival, acquire on leaving). bar_ptr: [count, generation, error]."""
    tl.debug_barrier()  # this program's threads have issued their writes before the release below
    gen = tl.atomic_add(bar_ptr + 1, 0, sem="acquire")  # cannot move on before this program arrives
    arrived = tl.atomic_add(bar_ptr, 1, sem="acq_rel")
    if arrived == nprog - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed")
        tl.atomic_add(bar_ptr + 1, 1, sem="release")  # orders the reset before the next barrier's arrivals
    else:
        cur = gen
        spins = 0
        while (cur == gen) & (spins < spin_max):
            cur = tl.atomic_add(bar_ptr + 1, 0, sem="acquire")
            spins += 1
        if cur == gen:
            tl.atomic_or(bar_ptr + 2, 1, sem="relaxed")  # gave up: the grid was not all resident
    tl.debug_barrier()


@triton.jit
def _first_tile(qw_ptr, N, inter, tpc, nprog, total, stride_qk, BLOCK_N: tl.constexpr, T: tl.constexpr,
                XPAIR: tl.constexpr, GATED: tl.constexpr):
    """This program's first weight tile of a phase (the even and odd words with XPAIR; the same tile twice
    without), loaded before anything the phase depends on."""
    R: tl.constexpr = T // 2 if XPAIR else T
    step: tl.constexpr = 2 if XPAIR else 1
    i_start = tl.program_id(0) * total // nprog
    col = i_start // tpc
    t = i_start - col * tpc
    wcols, ok = strip_cols(col, tl.arange(0, BLOCK_N), N, inter, BLOCK_N, GATED)
    w_ptrs = qw_ptr + (t * T + step * tl.arange(0, R))[:, None].to(tl.int64) * stride_qk + wcols[None, :]
    w_mask = (i_start < total) & ok[None, :]
    nxt = tl.load(w_ptrs, mask=w_mask)
    if XPAIR:
        nxt_o = tl.load(w_ptrs + stride_qk, mask=w_mask)
    else:
        nxt_o = nxt
    return nxt, nxt_o


@triton.jit
def _stream(nxt, nxt_o, x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, group_size, tpc,
            nprog, total, stride_qk, stride_sg, exp0, hi_shift, inter, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
            T: tl.constexpr, JG: tl.constexpr, HAS_PERM: tl.constexpr, EVEN: tl.constexpr, XPAIR: tl.constexpr,
            GATED: tl.constexpr, H2: tl.constexpr, ASM: tl.constexpr, XMOD: tl.constexpr):
    """One GEMV phase, gemv4's loop (kernels/w4a16_stream.py, without its L2 hints): this program's run of tiles
    [pid * total // nprog, (pid + 1) * total // nprog) numbered strip by strip (runs differ by at most a tile), `nxt`/`nxt_o` its first tile (`_first_tile`), the next tile in
    flight while this one is computed; strip sums through the split-K workspace (`strip_done`)."""
    S: tl.constexpr = ROWS // 8
    H: tl.constexpr = S // T
    R: tl.constexpr = T // 2 if XPAIR else T
    step: tl.constexpr = 2 if XPAIR else 1
    i_start = tl.program_id(0) * total // nprog
    i_end = (tl.program_id(0) + 1) * total // nprog
    offs_b = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    col = i_start // tpc
    t = i_start - col * tpc
    x2_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    count = 0
    for i in range(i_start, i_end):
        words = nxt
        words_o = nxt_o
        offs_n, n_mask = strip_cols(col, offs_b, N, inter, BLOCK_N, GATED)
        i1 = i + 1
        t1 = t + 1
        wrap = t1 == tpc
        t1 = tl.where(wrap, 0, t1)
        col1 = col + wrap.to(tl.int32)
        wcols, ok = strip_cols(col1, offs_b, N, inter, BLOCK_N, GATED)
        w_ptrs = qw_ptr + (t1 * T + step * offs_r)[:, None].to(tl.int64) * stride_qk + wcols[None, :]
        w_mask = (i1 < i_end) & ok[None, :]
        nxt = tl.load(w_ptrs, mask=w_mask)
        if XPAIR:
            nxt_o = tl.load(w_ptrs + stride_qk, mask=w_mask)
        else:
            nxt_o = nxt
        k0 = (t // H) * ROWS + (t % H) * T
        if H2:
            acc = tile_sums_h2(acc, words, words_o, k0, x_ptr, x2_ptr, perm_ptr, s_ptr, z_ptr, K, group_size, offs_n,
                               n_mask, offs_r, stride_sg, S, XPAIR, EVEN, HAS_PERM, ASM, XMOD)
        else:
            acc = tile_sums(acc, words, words_o, k0, x_ptr, x2_ptr, perm_ptr, s_ptr, z_ptr, K, group_size, offs_n,
                            n_mask, offs_r, stride_sg, exp0, hi_shift, S, JG, XPAIR, EVEN, HAS_PERM, False, XMOD)
        count += 1
        if (t == tpc - 1) | (i1 == i_end):
            strip_done(acc, col * BLOCK_N + offs_b, n_mask, col, count, tpc, inter, out_ptr, ws_ptr, cnt_ptr,
                       BLOCK_N, GATED)
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            count = 0
        col = col1
        t = t1


@triton.jit(do_not_specialize=["nprog"])  # one compiled kernel whatever the grid (its occupancy sets the grid)
def _w4a16_mlp_kernel(
    x_ptr,  # [1, hidden] the MLP's input
    qa_ptr, sa_ptr, za_ptr, pa_ptr,  # gate/up: [*, 2 inter] words, [G, 2 inter] scales, zeros; perm [hidden] or any
    qb_ptr, sb_ptr, zb_ptr, pb_ptr,  # down: [*, hidden] words, scales, zeros; perm [inter] or any
    act_ptr,  # [1, inter] silu(gate) * up (written in phase A, read in phase B)
    out_ptr,  # [1, hidden]
    ws_ptr, cnt_ptr,  # split-K workspace; phase B's part starts at ws_b / cnt_b
    bar_ptr,  # [count, generation, error] int32 (PHASE 0)
    K_A, gs_a, tpc_a, total_a, sqk_a, ssg_a,
    N_B, K_B, gs_b, tpc_b, total_b, sqk_b, ssg_b,
    inter, ws_b, cnt_b, nprog, spin_max, exp0, hi_shift,
    ROWS_A: tl.constexpr, BN_A: tl.constexpr, T_A: tl.constexpr, JG_A: tl.constexpr, PERM_A: tl.constexpr,
    EVEN_A: tl.constexpr, XPAIR_A: tl.constexpr, H2_A: tl.constexpr,
    ROWS_B: tl.constexpr, BN_B: tl.constexpr, T_B: tl.constexpr, JG_B: tl.constexpr, PERM_B: tl.constexpr,
    EVEN_B: tl.constexpr, XPAIR_B: tl.constexpr, H2_B: tl.constexpr,
    PHASE: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr, L2_B: tl.constexpr = 0,
):
    """PHASE 0: A (gate/up, gated epilogue into act), B's first tile, grid barrier, B (down). 1: A only. 2: B only
    (its first tile before the PDL wait, as the GEMVs do). L2_B > 0 (CUDA): before the barrier, also ask L2 for the
    program's next L2_B tiles of B (`prefetch_tile`: no registers held), so HBM keeps streaming while it waits."""
    if PDL >= 2:
        gdc_launch_dependents()
    if PHASE != 2:
        nxt, nxt_o = _first_tile(qa_ptr, 2 * inter, inter, tpc_a, nprog, total_a, sqk_a, BN_A, T_A, XPAIR_A, True)
        if PDL >= 1:
            gdc_wait()
        _stream(nxt, nxt_o, x_ptr, qa_ptr, sa_ptr, za_ptr, pa_ptr, act_ptr, ws_ptr, cnt_ptr, 2 * inter, K_A, gs_a,
                tpc_a, nprog, total_a, sqk_a, ssg_a, exp0, hi_shift, inter, ROWS_A, BN_A, T_A, JG_A, PERM_A, EVEN_A,
                XPAIR_A, True, H2_A, ASM, "")
    if PHASE != 1:
        nxt, nxt_o = _first_tile(qb_ptr, N_B, N_B, tpc_b, nprog, total_b, sqk_b, BN_B, T_B, XPAIR_B, False)
        if L2_B > 0:
            i0 = tl.program_id(0) * total_b // nprog
            i_end = (tl.program_id(0) + 1) * total_b // nprog
            for ip in tl.static_range(1, L2_B + 1):
                prefetch_tile(qb_ptr, (i0 + ip) // tpc_b, (i0 + ip) % tpc_b, i0 + ip < i_end, N_B, N_B, sqk_b, T_B,
                              BN_B, False)
        if PHASE == 0:
            grid_barrier(bar_ptr, nprog, spin_max)
        elif PDL >= 1:
            gdc_wait()
        _stream(nxt, nxt_o, act_ptr, qb_ptr, sb_ptr, zb_ptr, pb_ptr, out_ptr, ws_ptr + ws_b, cnt_ptr + cnt_b, N_B, K_B,
                gs_b, tpc_b, nprog, total_b, sqk_b, ssg_b, exp0, hi_shift, N_B, ROWS_B, BN_B, T_B, JG_B, PERM_B,
                EVEN_B, XPAIR_B, False, H2_B, ASM, ".cg")


_BARRIERS: dict[torch.device, torch.Tensor] = {}


def barrier(device: torch.device) -> torch.Tensor:
    """The device's barrier words [count, generation, error], made once (before CUDA graph capture: `reserve`)."""
    device = torch.device(device)
    if device not in _BARRIERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the W4A16 MLP barrier must be made before CUDA graph capture (kernels/w4a16_mlp.reserve)")
        _BARRIERS[device] = torch.zeros(4, dtype=torch.int32, device=device)
    return _BARRIERS[device]


def errors(device: torch.device) -> int:
    """Nonzero when a barrier gave up waiting since the last `clear_errors` (the grid was not co-resident)."""
    return int(barrier(device)[2].item())


def clear_errors(device: torch.device) -> None:
    barrier(device)[2].zero_()


def reserve(device: torch.device, hidden: int, inter: int) -> None:
    """At load, before capture: the barrier words and split-K workspace room for both phases."""
    barrier(device)
    splitk.reserve(device, 2 * inter + 2 * hidden + 4096)


def _occupancy(compiled, num_warps: int) -> int:
    """Programs of this compiled kernel that fit on one SM at once (registers, threads, shared memory)."""
    init = getattr(compiled, "_init_handles", None)  # loads the module, which fills n_regs
    if init is not None:
        init()
    regs = max(1, int(getattr(compiled, "n_regs", 0) or 255))
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (65536 // per_warp) // num_warps
    by_threads = 2048 // (32 * num_warps)
    shared = int(getattr(compiled.metadata, "shared", 0) if hasattr(compiled, "metadata") else 0)
    by_shared = 32 if shared == 0 else (227 * 1024) // shared
    return max(0, min(32, by_regs, by_threads, by_shared))


_GRIDS: dict[tuple, int] = {}
"""(device, constexprs) -> programs per SM that fit (compiled once, outside any capture)."""


def _geometry(k: int, group_size: int, t: int) -> tuple[int, int, int, int]:
    """(rows per block, T, JG, tiles per strip) of one GEMV with K = k."""
    rows = 64 if 0 < k % 128 <= 64 else 128
    t = min(t, rows // 8)
    jg = group_words(group_size, k, rows, group_size % rows == 0 or group_size >= k, "the W4A16 MLP")
    tpc = -(-k // rows) * (rows // 8) // t
    return rows, t, jg, tpc


def mlp(x: torch.Tensor, gate_up: tuple, down: tuple, config: dict | None = None, phases: int | None = None,
        pdl: int | None = None, warmup: bool = False) -> torch.Tensor | None:
    """x [1, hidden] -> down(silu(gate) * up) [1, hidden] in x's dtype. gate_up, down: (qweight, scales, zeros,
    group_size, perm) in kernels/w4a16.py's layout (gate_up's N = 2 inter, gate columns first). config: T_A, BN_A
    (gate/up tile: words x columns, half gate half up), T_B, BN_B (down), num_warps, PER_SM (programs per SM, capped
    by the occupancy), H2 (kernels/w4a16_half2.py where the group covers a tile), L2_B (down tiles asked of L2 before
    the barrier). phases: 1 (the barrier in one
    launch) or 2 (two launches); default 1 on CUDA, 2 elsewhere (the interpreter cannot run a spin-wait). pdl: 0, 1
    or 2 as the GEMVs' PDL (default 2 where kernels/pdl.py is on, else 0). warmup: compile (and measure the occupancy) without launching; returns None."""
    cfg = dict(DEFAULT, **(config or {}))
    qa, sa, za, ga, pa = gate_up
    qb, sb, zb, gb, pb = down
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"the W4A16 MLP kernel takes x [1, hidden], got {tuple(x.shape)}")
    hidden, inter = x.shape[1], qa.shape[1] // 2
    if qa.shape[1] % 2 or qb.shape[1] != hidden:
        raise ValueError(f"gate_up N must be 2 * inter and down N = hidden = {hidden}, got {qa.shape[1]} and "
                         f"{qb.shape[1]}")
    for name, (q, s, z, p, k) in (("gate_up", (qa, sa, za, pa, hidden)), ("down", (qb, sb, zb, pb, inter))):
        rows = 64 if 0 < k % 128 <= 64 else 128
        if q.dtype != torch.int32 or q.shape[0] != -(-k // rows) * rows // 8 or q.stride(1) != 1:
            raise ValueError(f"{name} qweight must be contiguous int32 [{-(-k // rows) * rows // 8}, N], got "
                             f"{q.dtype} {tuple(q.shape)}")
        if s.stride() != z.stride() or s.stride(1) != 1:
            raise ValueError(f"{name} scales and zeros must be contiguous with the same strides")
        if p is not None and (p.shape != (k,) or p.dtype != torch.int32):
            raise ValueError(f"{name} perm must be int32 [{k}], got {p.dtype} {tuple(p.shape)}")
    x = x.contiguous()
    phases = phases or (1 if x.is_cuda else 2)
    if phases == 1 and not x.is_cuda:
        raise ValueError("phases=1 (a grid-wide spin barrier) needs CUDA: the interpreter runs programs one by one")
    if pdl is None:
        pdl = 2 if pdl_launch.on(x) else 0
    dt = x.dtype
    rows_a, t_a, jg_a, tpc_a = _geometry(hidden, ga, cfg["T_A"])
    rows_b, t_b, jg_b, tpc_b = _geometry(inter, gb, cfg["T_B"])
    xp_a = dt == torch.bfloat16 and pa is None and hidden % rows_a == 0
    xp_b = dt == torch.bfloat16 and pb is None and inter % rows_b == 0
    h2_a, xp_a = half2_mode(cfg["H2"], jg_a, dt, xp_a)
    h2_b, xp_b = half2_mode(cfg["H2"], jg_b, dt, xp_b)
    strips_a = triton.cdiv(inter, cfg["BN_A"] // 2)
    strips_b = triton.cdiv(hidden, cfg["BN_B"])
    total_a, total_b = strips_a * tpc_a, strips_b * tpc_b
    ws, cnt = splitk.workspace(x.device, strips_a * cfg["BN_A"] + strips_b * cfg["BN_B"])
    bar = barrier(x.device) if x.is_cuda else cnt
    act = torch.empty((1, inter), dtype=dt, device=x.device)
    out = torch.empty((1, hidden), dtype=dt, device=x.device)
    consts = dict(ROWS_A=rows_a, BN_A=cfg["BN_A"], T_A=t_a, JG_A=jg_a, PERM_A=pa is not None, EVEN_A=hidden % rows_a == 0,
                  XPAIR_A=xp_a, H2_A=h2_a, ROWS_B=rows_b, BN_B=cfg["BN_B"], T_B=t_b, JG_B=jg_b, PERM_B=pb is not None,
                  EVEN_B=inter % rows_b == 0, XPAIR_B=xp_b, H2_B=h2_b, PDL=pdl if x.is_cuda else 0, ASM=x.is_cuda,
                  L2_B=cfg["L2_B"] if x.is_cuda else 0, num_warps=cfg["num_warps"], num_stages=1)
    if consts["PDL"]:
        consts["launch_pdl"] = True
    sms = splitk.sm_count(x.device)

    def args(nprog):
        return (x, qa, sa, za, pa if pa is not None else qa, qb, sb, zb, pb if pb is not None else qb, act, out, ws,
                cnt, bar, hidden, ga, tpc_a, total_a, qa.stride(0), sa.stride(0), hidden, inter, gb, tpc_b, total_b,
                qb.stride(0), sb.stride(0), inter, strips_a * cfg["BN_A"], strips_a, nprog, SPIN_MAX, 150 << 23, 20)

    if phases == 1:
        compiled = None
        key = (x.device, tuple(sorted(consts.items())))
        if warmup or key not in _GRIDS:  # compiling is a cache hit after the first time
            compiled = _w4a16_mlp_kernel.warmup(*args(sms), grid=(sms,), PHASE=0, **consts)
        if warmup:  # (maybe on a compile thread: the occupancy is read on the first launch, which loads the module)
            return None
        if key not in _GRIDS:
            _GRIDS[key] = _occupancy(compiled, cfg["num_warps"])
        fit = _GRIDS[key]
        per_sm = min(cfg["PER_SM"], fit)
        if per_sm < 1:
            raise ValueError(f"the W4A16 MLP kernel with {cfg} does not fit one program per SM")
        nprog = sms * per_sm
        _w4a16_mlp_kernel[(nprog,)](*args(nprog), PHASE=0, **consts)
    else:
        nprog = sms * cfg["PER_SM"]
        if warmup:
            for phase in (1, 2):
                _w4a16_mlp_kernel.warmup(*args(nprog), grid=(nprog,), PHASE=phase, **consts)
            return None
        _w4a16_mlp_kernel[(nprog,)](*args(nprog), PHASE=1, **consts)
        _w4a16_mlp_kernel[(nprog,)](*args(nprog), PHASE=2, **consts)
    return out


__all__ = ["mlp", "config_for", "TUNED", "reserve", "barrier", "errors", "clear_errors", "grid_barrier", "DEFAULT", "SPIN_MAX"]
