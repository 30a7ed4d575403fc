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

DEFAULT = dict(T_Q=8, BN_Q=256, T_O=8, BN_O=256, T_A=8, BN_A=512, T_B=8, BN_B=256, num_warps=4, PER_SM=2, H2=2, L2=0,
               DEPTH=1)
"""Launch config where TUNED has none: 4 warps, 2 programs per SM, the config every GPU check passed with (H200 rounds
2-3, act-order included). PER_SM 0 (as many programs as fit) was faster on the 8B shape (35.4 against ~42 us per MLP)
but gave wrong values on the H200 in round 4 of session 9: the act-order g32 shapes in one launch (MLP rel err 0.16,
post-attention + front NaN), and DEPTH 2's post-attention (NaN); not the default until that is understood
(docs/quantization.md)."""

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
                XPAIR: tl.constexpr, GATED: tl.constexpr, DEPTH: tl.constexpr):
    """This program's first weight tile of a phase (the even and odd words with XPAIR; the same tile twice
    without), loaded before anything the phase depends on. DEPTH 0 (the pipelined loop loads its own): no load."""
    R: tl.constexpr = T // 2 if XPAIR else T
    step: tl.constexpr = 2 if XPAIR else 1
    i_start = tl.program_id(0) * total // nprog
    col = i_start // tpc
    t = i_start - col * tpc
    wcols, ok = strip_cols(col, tl.arange(0, BLOCK_N), N, inter, BLOCK_N, GATED)
    w_ptrs = qw_ptr + (t * T + step * tl.arange(0, R))[:, None].to(tl.int64) * stride_qk + wcols[None, :]
    w_mask = (i_start < total) & ok[None, :] & (DEPTH > 0)
    nxt = tl.load(w_ptrs, mask=w_mask, other=0)
    if XPAIR:
        nxt_o = tl.load(w_ptrs + stride_qk, mask=w_mask, other=0)
    else:
        nxt_o = nxt
    return nxt, nxt_o


@triton.jit
def _advance(col, t, tpc):
    """The (strip, tile) after (col, t) in the strip-by-strip numbering (no division per step)."""
    t1 = t + 1
    wrap = t1 == tpc
    return col + wrap.to(tl.int32), tl.where(wrap, 0, t1)


@triton.jit
def _load_tile(qw_ptr, col, t, valid, N, inter, stride_qk, offs_b, offs_r, BLOCK_N: tl.constexpr, T: tl.constexpr,
               XPAIR: tl.constexpr, GATED: tl.constexpr):
    step: tl.constexpr = 2 if XPAIR else 1
    wcols, ok = strip_cols(col, offs_b, N, inter, BLOCK_N, GATED)
    w_ptrs = qw_ptr + (t * T + step * offs_r)[:, None].to(tl.int64) * stride_qk + wcols[None, :]
    w_mask = valid & ok[None, :]
    words = tl.load(w_ptrs, mask=w_mask)
    if XPAIR:
        words_o = tl.load(w_ptrs + stride_qk, mask=w_mask)
    else:
        words_o = words
    return words, words_o


@triton.jit
def _stream(nxt, nxt_o, x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, group_size, tpc,
            nprog, total, stride_qk, stride_sg, exp0, hi_shift, inter, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
            T: tl.constexpr, JG: tl.constexpr, HAS_PERM: tl.constexpr, EVEN: tl.constexpr, XPAIR: tl.constexpr,
            GATED: tl.constexpr, H2: tl.constexpr, ASM: tl.constexpr, XMOD: tl.constexpr, DEPTH: tl.constexpr,
            STAGES: tl.constexpr):
    """One GEMV phase, gemv4's loop (kernels/w4a16_stream.py, without its L2 hints): this program's run of tiles
    [pid * total // nprog, (pid + 1) * total // nprog) numbered strip by strip (runs differ by at most a tile),
    `nxt`/`nxt_o` its first tile (`_first_tile`); DEPTH (1 or 2) tiles in flight while one is computed; DEPTH 0:
    each strip's tiles through `tl.range(num_stages=STAGES)` (cp.async into shared memory: STAGES - 1 tiles in flight
    without holding registers; the first tile is not preloaded, L2 covers that); strip sums through the split-K
    workspace (`strip_done`)."""
    S: tl.constexpr = ROWS // 8
    H: tl.constexpr = S // T
    R: tl.constexpr = T // 2 if XPAIR else T
    i_start = tl.program_id(0) * total // nprog
    i_end = (tl.program_id(0) + 1) * total // nprog
    offs_b = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    col = i_start // tpc
    t = i_start - col * tpc
    x2_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    if DEPTH == 0:  # per strip of the run, its tiles through Triton's software pipeline (cp.async into shared memory)
        i = i_start
        while i < i_end:
            c = i // tpc
            t0 = i - c * tpc
            n = tl.minimum(i_end - i, tpc - t0)
            offs_n, n_mask = strip_cols(c, offs_b, N, inter, BLOCK_N, GATED)
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for j in tl.range(0, n, num_stages=STAGES):  # no strip_done inside: its atomics stop the pipeliner
                tj = t0 + j
                words, words_o = _load_tile(qw_ptr, c, tj, True, N, inter, stride_qk, offs_b, offs_r, BLOCK_N, T,
                                            XPAIR, GATED)
                k0 = (tj // H) * ROWS + (tj % H) * T
                if H2:
                    acc = tile_sums_h2(acc, words, words_o, k0, x_ptr, x2_ptr, perm_ptr, s_ptr, z_ptr, K, group_size,
                                       offs_n, n_mask, offs_r, stride_sg, S, XPAIR, EVEN, HAS_PERM, ASM, XMOD)
                else:
                    acc = tile_sums(acc, words, words_o, k0, x_ptr, x2_ptr, perm_ptr, s_ptr, z_ptr, K, group_size,
                                    offs_n, n_mask, offs_r, stride_sg, exp0, hi_shift, S, JG, XPAIR, EVEN, HAS_PERM,
                                    False, XMOD)
            strip_done(acc, c * BLOCK_N + offs_b, n_mask, c, n, tpc, inter, out_ptr, ws_ptr, cnt_ptr, BLOCK_N, GATED)
            i += n
    else:
        col_l = col  # the last tile loaded: i_start + DEPTH - 1
        t_l = t
        if DEPTH == 2:
            col_l, t_l = _advance(col, t, tpc)
            nxt2, nxt2_o = _load_tile(qw_ptr, col_l, t_l, i_start + 1 < i_end, N, inter, stride_qk, offs_b, offs_r,
                                      BLOCK_N, T, XPAIR, GATED)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        count = 0
        for i in range(i_start, i_end):
            words = nxt
            words_o = nxt_o
            offs_n, n_mask = strip_cols(col, offs_b, N, inter, BLOCK_N, GATED)
            col_l, t_l = _advance(col_l, t_l, tpc)
            if DEPTH == 2:
                nxt = nxt2
                nxt_o = nxt2_o
                nxt2, nxt2_o = _load_tile(qw_ptr, col_l, t_l, i + 2 < i_end, N, inter, stride_qk, offs_b, offs_r,
                                          BLOCK_N, T, XPAIR, GATED)
            else:
                nxt, nxt_o = _load_tile(qw_ptr, col_l, t_l, i + 1 < i_end, N, inter, stride_qk, offs_b, offs_r, BLOCK_N,
                                        T, XPAIR, GATED)
            k0 = (t // H) * ROWS + (t % H) * T
            if H2:
                acc = tile_sums_h2(acc, words, words_o, k0, x_ptr, x2_ptr, perm_ptr, s_ptr, z_ptr, K, group_size,
                                   offs_n, n_mask, offs_r, stride_sg, S, XPAIR, EVEN, HAS_PERM, ASM, XMOD)
            else:
                acc = tile_sums(acc, words, words_o, k0, x_ptr, x2_ptr, perm_ptr, s_ptr, z_ptr, K, group_size, offs_n,
                                n_mask, offs_r, stride_sg, exp0, hi_shift, S, JG, XPAIR, EVEN, HAS_PERM, False, XMOD)
            count += 1
            if (t == tpc - 1) | (i + 1 == i_end):
                strip_done(acc, col * BLOCK_N + offs_b, n_mask, col, count, tpc, inter, out_ptr, ws_ptr, cnt_ptr,
                           BLOCK_N, GATED)
                acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
                count = 0
            col, t = _advance(col, t, tpc)


@triton.jit
def _l2_ahead(qw_ptr, N, inter, tpc, nprog, total, stride_qk, T: tl.constexpr, BLOCK_N: tl.constexpr,
              GATED: tl.constexpr, L2: tl.constexpr):
    """Ask L2 for tiles 1..L2 of this program's run of a phase (its tile 0 is loaded into registers)."""
    i0 = tl.program_id(0) * total // nprog
    i_end = (tl.program_id(0) + 1) * total // nprog
    for ip in tl.static_range(1, L2 + 1):
        prefetch_tile(qw_ptr, (i0 + ip) // tpc, (i0 + ip) % tpc, i0 + ip < i_end, N, inter, stride_qk, T, BLOCK_N,
                      GATED)


@triton.jit
def _norm_slice(o_ptr, r_ptr, w_ptr, xn_ptr, hidden, eps, nprog, HB: tl.constexpr, NB: tl.constexpr,
                RMOD: tl.constexpr):
    """Programs 0 .. min(nprog, ceil(hidden / NB)) - 1: h = o + r rounded to the model dtype (o: written in this
    launch, read at L2), rms_norm(h) * w rounded as kernels/fused_norm.py's Llama norm rounds, written into xn for
    this program's slices of NB columns (slices pid, pid + nprog, ...). Each such program sums the whole row's squares
    itself (no second barrier for the sum). RMOD: r's load modifier (".cg" where this launch wrote r)."""
    pid = tl.program_id(0)
    if pid * NB < hidden:
        offs = tl.arange(0, HB)
        mask = offs < hidden
        dt = r_ptr.dtype.element_ty
        o = tl.load(o_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        h = (o + tl.load(r_ptr + offs, mask=mask, other=0.0, cache_modifier=RMOD).to(tl.float32)).to(dt).to(tl.float32)
        var = tl.sum(h * h, axis=0) / hidden
        normed = h * tl.rsqrt(var + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = w * normed.to(dt).to(tl.float32)
        tl.store(xn_ptr + offs, y.to(dt), mask=mask & ((offs // NB) % nprog == pid))


@triton.jit
def _residual_slice(o_ptr, r_ptr, hidden, nprog, NB: tl.constexpr, RMOD: tl.constexpr):
    """r = o + r (model dtype) for this program's slices of NB columns (as `_norm_slice`'s), once every program has
    read the old r."""
    for s in range(tl.program_id(0), tl.cdiv(hidden, NB), nprog):
        offs = s * NB + tl.arange(0, NB)
        mask = offs < hidden
        o = tl.load(o_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0, cache_modifier=RMOD).to(tl.float32)
        tl.store(r_ptr + offs, (o + r).to(r_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["nprog"])  # one compiled kernel whatever the grid (its occupancy sets the grid)
def _w4a16_mlp_kernel(
    x_ptr,  # [1, hidden] the MLP's input (HAS_O: the attention output [1, K_O], o_proj's input)
    qo_ptr, so_ptr, zo_ptr, po_ptr,  # o_proj (HAS_O): [*, hidden] words, scales, zeros; perm [K_O] or any
    qa_ptr, sa_ptr, za_ptr, pa_ptr,  # gate/up: [*, 2 inter] words, [G, 2 inter] scales, zeros; perm [hidden] or any
    qb_ptr, sb_ptr, zb_ptr, pb_ptr,  # down: [*, hidden] words, scales, zeros; perm [inter] or any
    o_ptr, r_ptr, nw_ptr, xn_ptr,  # HAS_O: o_proj's output, the residual (updated), the norm's weight, its output
    act_ptr,  # [1, inter] silu(gate) * up (written in phase A, read in phase B)
    out_ptr,  # [1, hidden]
    ws_ptr, cnt_ptr,  # split-K workspace; each GEMV's part at its offsets
    bar_ptr,  # [count, generation, error] int32 (PHASE 0)
    qq_ptr, sq_ptr, zq_ptr, pq_ptr,  # HAS_FRONT: the next layer's qkv projection [*, N_Q] words, scales, zeros, perm
    nw2_ptr, xq_ptr, qkv_ptr,  # HAS_FRONT: the next layer's input norm weight, its output, the qkv output [1, N_Q]
    N_Q, gs_q, tpc_q, total_q, sqk_q, ssg_q, ws_q, cnt_q, eps2,
    K_O, gs_o, tpc_o, total_o, sqk_o, ssg_o,
    K_A, gs_a, tpc_a, total_a, sqk_a, ssg_a,
    N_B, K_B, gs_b, tpc_b, total_b, sqk_b, ssg_b,
    inter, ws_a, cnt_a, ws_b, cnt_b, eps, nprog, spin_max, exp0, hi_shift,
    ROWS_O: tl.constexpr, BN_O: tl.constexpr, T_O: tl.constexpr, JG_O: tl.constexpr, PERM_O: tl.constexpr,
    EVEN_O: tl.constexpr, XPAIR_O: tl.constexpr, H2_O: tl.constexpr,
    ROWS_A: tl.constexpr, BN_A: tl.constexpr, T_A: tl.constexpr, JG_A: tl.constexpr, PERM_A: tl.constexpr,
    EVEN_A: tl.constexpr, XPAIR_A: tl.constexpr, H2_A: tl.constexpr,
    ROWS_B: tl.constexpr, BN_B: tl.constexpr, T_B: tl.constexpr, JG_B: tl.constexpr, PERM_B: tl.constexpr,
    EVEN_B: tl.constexpr, XPAIR_B: tl.constexpr, H2_B: tl.constexpr,
    ROWS_Q: tl.constexpr, BN_Q: tl.constexpr, T_Q: tl.constexpr, JG_Q: tl.constexpr, PERM_Q: tl.constexpr,
    EVEN_Q: tl.constexpr, XPAIR_Q: tl.constexpr, H2_Q: tl.constexpr, HAS_FRONT: tl.constexpr,
    PHASE: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr, HAS_O: tl.constexpr, HB: tl.constexpr,
    NB: tl.constexpr, L2: tl.constexpr = 0, DEPTH: tl.constexpr = 1, STAGES: tl.constexpr = 3,
):
    """PHASE 0, all in this launch: [HAS_O: O (o_proj of the attention output into o), gate/up's first tile, barrier,
    N (norm slices into xn), barrier, R (residual slices)], A (gate/up, gated epilogue into act; x is xn with HAS_O),
    B's first tile, barrier, B (down) [HAS_FRONT (with HAS_O), the next layer's front: Q's first tile, barrier, N2
    (its input norm of out + r into xq, r read at L2), barrier, R2 (residual slices), Q (its qkv projection of xq)].
    PHASE 1 O, 2 N, 3 R, 4 A, 5 B, 6 N2, 7 R2, 8 Q: that phase alone, one launch each (each waits for the previous
    launch; the GEMVs load their first tile before that wait). L2 > 0 (CUDA): before each barrier
    a program also asks L2 for its next L2 tiles of the phase after it (`prefetch_tile`: no registers held), so HBM
    keeps streaming while it waits."""
    if PDL >= 2:
        gdc_launch_dependents()
    xa_ptr = xn_ptr if HAS_O else x_ptr
    if HAS_O and (PHASE == 0 or PHASE == 1):
        nxt, nxt_o = _first_tile(qo_ptr, N_B, N_B, tpc_o, nprog, total_o, sqk_o, BN_O, T_O, XPAIR_O, False, DEPTH)
        if PDL >= 1:
            gdc_wait()
        _stream(nxt, nxt_o, x_ptr, qo_ptr, so_ptr, zo_ptr, po_ptr, o_ptr, ws_ptr, cnt_ptr, N_B, K_O, gs_o, tpc_o,
                nprog, total_o, sqk_o, ssg_o, exp0, hi_shift, N_B, ROWS_O, BN_O, T_O, JG_O, PERM_O, EVEN_O, XPAIR_O,
                False, H2_O, ASM, "", DEPTH, STAGES)
    if PHASE == 0 or PHASE == 4:
        nxt, nxt_o = _first_tile(qa_ptr, 2 * inter, inter, tpc_a, nprog, total_a, sqk_a, BN_A, T_A, XPAIR_A, True,
                                 DEPTH)
    if HAS_O and PHASE == 0:
        if L2 > 0:
            _l2_ahead(qa_ptr, 2 * inter, inter, tpc_a, nprog, total_a, sqk_a, T_A, BN_A, True, L2)
        grid_barrier(bar_ptr, nprog, spin_max)
    if HAS_O and (PHASE == 0 or PHASE == 2):
        if PHASE == 2 and PDL >= 1:
            gdc_wait()
        _norm_slice(o_ptr, r_ptr, nw_ptr, xn_ptr, N_B, eps, nprog, HB, NB, "")
    if HAS_O and PHASE == 0:
        grid_barrier(bar_ptr, nprog, spin_max)
    if HAS_O and (PHASE == 0 or PHASE == 3):
        if PHASE == 3 and PDL >= 1:
            gdc_wait()
        _residual_slice(o_ptr, r_ptr, N_B, nprog, NB, "")
    if PHASE == 0 or PHASE == 4:
        if PHASE == 4 or not HAS_O:
            if PDL >= 1:
                gdc_wait()
        _stream(nxt, nxt_o, xa_ptr, qa_ptr, sa_ptr, za_ptr, pa_ptr, act_ptr, ws_ptr + ws_a, cnt_ptr + cnt_a, 2 * inter,
                K_A, gs_a, tpc_a, nprog, total_a, sqk_a, ssg_a, exp0, hi_shift, inter, ROWS_A, BN_A, T_A, JG_A, PERM_A,
                EVEN_A, XPAIR_A, True, H2_A, ASM, ".cg" if HAS_O else "", DEPTH, STAGES)
    if PHASE == 0 or PHASE == 5:
        nxt, nxt_o = _first_tile(qb_ptr, N_B, N_B, tpc_b, nprog, total_b, sqk_b, BN_B, T_B, XPAIR_B, False, DEPTH)
        if L2 > 0:
            _l2_ahead(qb_ptr, N_B, N_B, tpc_b, nprog, total_b, sqk_b, T_B, BN_B, False, L2)
        if PHASE == 0:
            grid_barrier(bar_ptr, nprog, spin_max)
        elif PDL >= 1:
            gdc_wait()
        _stream(nxt, nxt_o, act_ptr, qb_ptr, sb_ptr, zb_ptr, pb_ptr, out_ptr, ws_ptr + ws_b, cnt_ptr + cnt_b, N_B, K_B,
                gs_b, tpc_b, nprog, total_b, sqk_b, ssg_b, exp0, hi_shift, N_B, ROWS_B, BN_B, T_B, JG_B, PERM_B,
                EVEN_B, XPAIR_B, False, H2_B, ASM, ".cg", DEPTH, STAGES)
    if HAS_FRONT and (PHASE == 0 or PHASE == 8):
        nxt, nxt_o = _first_tile(qq_ptr, N_Q, N_Q, tpc_q, nprog, total_q, sqk_q, BN_Q, T_Q, XPAIR_Q, False, DEPTH)
    if HAS_FRONT and PHASE == 0:
        if L2 > 0:
            _l2_ahead(qq_ptr, N_Q, N_Q, tpc_q, nprog, total_q, sqk_q, T_Q, BN_Q, False, L2)
        grid_barrier(bar_ptr, nprog, spin_max)
    if HAS_FRONT and (PHASE == 0 or PHASE == 6):
        if PHASE == 6 and PDL >= 1:
            gdc_wait()
        _norm_slice(out_ptr, r_ptr, nw2_ptr, xq_ptr, N_B, eps2, nprog, HB, NB, ".cg")
    if HAS_FRONT and PHASE == 0:
        grid_barrier(bar_ptr, nprog, spin_max)
    if HAS_FRONT and (PHASE == 0 or PHASE == 7):
        if PHASE == 7 and PDL >= 1:
            gdc_wait()
        _residual_slice(out_ptr, r_ptr, N_B, nprog, NB, ".cg")
    if HAS_FRONT and (PHASE == 0 or PHASE == 8):
        if PHASE == 8 and PDL >= 1:
            gdc_wait()
        _stream(nxt, nxt_o, xq_ptr, qq_ptr, sq_ptr, zq_ptr, pq_ptr, qkv_ptr, ws_ptr + ws_q, cnt_ptr + cnt_q, N_Q, N_B,
                gs_q, tpc_q, nprog, total_q, sqk_q, ssg_q, exp0, hi_shift, N_Q, ROWS_Q, BN_Q, T_Q, JG_Q, PERM_Q,
                EVEN_Q, XPAIR_Q, False, H2_Q, ASM, ".cg", DEPTH, STAGES)


_BARRIERS: dict[torch.device, torch.Tensor] = {}


def barrier(device: torch.device) -> torch.Tensor:
    """The device's barrier words [count, generation, error], made once (before CUDA graph capture: `reserve`)."""
    device = torch.device(device)
    if device not in _BARRIERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the W4A16 MLP barrier must be made before CUDA graph capture "
                               "(kernels/w4a16_mlp.reserve)")
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


def _gemv(name: str, w: tuple, k: int, n: int, t: int, bn: int, h2: int, dtype: torch.dtype, gated: bool) -> dict:
    """One GEMV's checks and launch geometry: w = (qweight, scales, zeros, group_size, perm), K = k inputs, N = n
    outputs (gated: n = 2 inter, strips of bn / 2 gate and as many up columns)."""
    q, s, z, g, p = w
    rows = 64 if 0 < k % 128 <= 64 else 128
    if q.dtype != torch.int32 or tuple(q.shape) != (-(-k // rows) * rows // 8, n) or q.stride(1) != 1:
        raise ValueError(f"{name} qweight must be contiguous int32 [{-(-k // rows) * rows // 8}, {n}], got "
                         f"{q.dtype} {tuple(q.shape)}")
    if s.stride() != z.stride() or s.stride(1) != 1 or tuple(s.shape) != (-(-k // g), n):
        raise ValueError(f"{name} scales and zeros must be contiguous [{-(-k // g)}, {n}] with the same strides, got "
                         f"{tuple(s.shape)}")
    if p is not None and (p.shape != (k,) or p.dtype != torch.int32):
        raise ValueError(f"{name} perm must be int32 [{k}], got {p.dtype} {tuple(p.shape)}")
    t = min(t, rows // 8)
    jg = group_words(g, k, rows, g % rows == 0 or g >= k, "the W4A16 MLP")
    tpc = -(-k // rows) * (rows // 8) // t
    h2, xpair = half2_mode(h2, jg, dtype, dtype == torch.bfloat16 and p is None and k % rows == 0)
    strips = triton.cdiv(n // 2, bn // 2) if gated else triton.cdiv(n, bn)
    return dict(w=w, k=k, tpc=tpc, total=strips * tpc, ws=strips * bn, strips=strips,
                consts=dict(ROWS=rows, BN=bn, T=t, JG=jg, PERM=p is not None, EVEN=k % rows == 0, XPAIR=xpair, H2=h2))


def _ints(gm: dict) -> tuple:
    q, s, _, g, _ = gm["w"]
    return gm["k"], g, gm["tpc"], gm["total"], q.stride(0), s.stride(0)


def _ptrs(gm: dict) -> tuple:
    q, s, z, _, p = gm["w"]
    return q, s, z, p if p is not None else q


def _run(x, gemvs: dict, post, cfg: dict, phases: int | None, pdl: int | None, warmup: bool, front=None):
    """Launch the kernel for gemvs {"o"?, "a", "b", "q"?} (from `_gemv`); post = (residual, norm weight, eps) with
    "o"; front = (the next layer's norm weight, eps) with "q". Returns down's output, or with "q" the qkv."""
    phases = phases or (1 if x.is_cuda else 2)
    if phases == 1 and not x.is_cuda:
        raise ValueError("phases=1 (a grid-wide spin barrier) needs CUDA: the interpreter runs programs one by one")
    if pdl is None:
        pdl = 2 if pdl_launch.on(x) else 0
    a, b = gemvs["a"], gemvs["b"]
    o = gemvs.get("o", a)
    qg = gemvs.get("q", b)
    has_o, has_front = "o" in gemvs, "q" in gemvs
    hidden, inter = b["w"][0].shape[1], a["w"][0].shape[1] // 2
    dt = x.dtype
    ws_a = o["ws"] if has_o else 0
    ws_q = ws_a + a["ws"] + b["ws"]
    ws, cnt = splitk.workspace(x.device, ws_q + (qg["ws"] if has_front else 0))
    bar = barrier(x.device) if x.is_cuda else cnt
    act = torch.empty((1, inter), dtype=dt, device=x.device)
    out = torch.empty((1, hidden), dtype=dt, device=x.device)
    if has_o:
        residual, norm_w, eps = post
        o_buf = torch.empty((1, hidden), dtype=dt, device=x.device)
        xn = torch.empty((1, hidden), dtype=dt, device=x.device)
    else:
        residual, norm_w, eps, o_buf, xn = out, out, 0.0, out, out
    if has_front:
        nw2, eps2 = front
        xq = torch.empty((1, hidden), dtype=dt, device=x.device)
        qkv = torch.empty((1, qg["w"][0].shape[1]), dtype=dt, device=x.device)
    else:
        nw2, eps2, xq, qkv = out, 0.0, out, out
    consts = {f"{key}_{tag}": v for tag, gm in (("O", o), ("A", a), ("B", b), ("Q", qg))
              for key, v in gm["consts"].items()}
    hb = triton.next_power_of_2(hidden)
    consts.update(PDL=pdl if x.is_cuda else 0, ASM=x.is_cuda, HAS_O=has_o, HAS_FRONT=has_front, HB=hb,
                  NB=max(128, hb // 32),
                  L2=cfg["L2"] if x.is_cuda else 0, DEPTH=cfg["DEPTH"],
                  STAGES=cfg.get("STAGES", 3), num_warps=cfg["num_warps"], num_stages=1)
    if cfg.get("maxnreg") and x.is_cuda:  # fewer registers per thread, more programs per SM (spills if too few)
        consts["maxnreg"] = cfg["maxnreg"]
    if consts["PDL"]:
        consts["launch_pdl"] = True
    sms = splitk.sm_count(x.device)

    def args(nprog):
        _, gs_q, tpc_q, total_q, sqk_q, ssg_q = _ints(qg)
        return (x, *_ptrs(o), *_ptrs(a), *_ptrs(b), o_buf, residual, norm_w, xn, act, out, ws, cnt, bar, *_ptrs(qg),
                nw2, xq, qkv, qg["w"][0].shape[1], gs_q, tpc_q, total_q, sqk_q, ssg_q, ws_q,
                (o["strips"] if has_o else 0) + a["strips"] + b["strips"], float(eps2), *_ints(o),
                *_ints(a), hidden, *_ints(b), inter, ws_a, o["strips"] if has_o else 0, ws_a + a["ws"],
                (o["strips"] if has_o else 0) + a["strips"], float(eps), nprog, SPIN_MAX, 150 << 23, 20)

    if phases == 1:
        compiled = None
        key = (x.device, tuple(sorted(consts.items())))
        if warmup or key not in _GRIDS:  # compiling is a cache hit after the first time
            compiled = _w4a16_mlp_kernel.warmup(*args(sms), grid=(sms,), PHASE=0, **consts)
        if warmup:  # (maybe on a compile thread: the occupancy is read on the first launch, which loads the module)
            return None
        if key not in _GRIDS:
            _GRIDS[key] = _occupancy(compiled, cfg["num_warps"])
        per_sm = min(cfg["PER_SM"] or _GRIDS[key], _GRIDS[key])
        if per_sm < 1:
            raise ValueError(f"the W4A16 MLP kernel with {cfg} does not fit one program per SM")
        nprog = sms * per_sm
        _w4a16_mlp_kernel[(nprog,)](*args(nprog), PHASE=0, **consts)
    else:
        nprog = sms * (cfg["PER_SM"] or 2)
        for phase in ((1, 2, 3, 4, 5) if has_o else (4, 5)) + ((6, 7, 8) if has_front else ()):
            if warmup:
                _w4a16_mlp_kernel.warmup(*args(nprog), grid=(nprog,), PHASE=phase, **consts)
            else:
                _w4a16_mlp_kernel[(nprog,)](*args(nprog), PHASE=phase, **consts)
        if warmup:
            return None
    return qkv if has_front else out


def mlp(x: torch.Tensor, gate_up: tuple, down: tuple, config: dict | None = None, phases: int | None = None,
        pdl: int | None = None, warmup: bool = False) -> torch.Tensor | None:
    """x [1, hidden] -> down(silu(gate) * up) [1, hidden] in x's dtype. gate_up, down: (qweight, scales, zeros,
    group_size, perm) in kernels/w4a16.py's layout (gate_up's N = 2 inter, gate columns first). config: T_A, BN_A
    (gate/up tile: words x columns, half gate half up), T_B, BN_B (down), num_warps, PER_SM (programs per SM, capped
    by the occupancy; 0: as many as fit), H2 (kernels/w4a16_half2.py where the group covers a tile), L2 (the next
    phase's tiles asked of L2 before a barrier), DEPTH (1 or 2 tiles in flight per program in registers; 0: Triton's
    pipeline into shared memory, STAGES stages), maxnreg. phases: 1 (the
    barriers in one launch) or 2 (a launch per phase); default 1 on CUDA, 2 elsewhere (the interpreter cannot run a
    spin-wait). pdl: 0, 1 or 2 as the GEMVs' PDL (default 2 where
    kernels/pdl.py is on, else 0). warmup: compile without launching; returns None."""
    cfg = dict(DEFAULT, **(config or {}))
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"the W4A16 MLP kernel takes x [1, hidden], got {tuple(x.shape)}")
    hidden, inter = x.shape[1], gate_up[0].shape[1] // 2
    if gate_up[0].shape[1] % 2 or down[0].shape[1] != hidden:
        raise ValueError(f"gate_up N must be 2 * inter and down N = hidden = {hidden}, got {gate_up[0].shape[1]} and "
                         f"{down[0].shape[1]}")
    gemvs = dict(a=_gemv("gate_up", gate_up, hidden, 2 * inter, cfg["T_A"], cfg["BN_A"], cfg["H2"], x.dtype, True),
                 b=_gemv("down", down, inter, hidden, cfg["T_B"], cfg["BN_B"], cfg["H2"], x.dtype, False))
    return _run(x.contiguous(), gemvs, None, cfg, phases, pdl, warmup)


def post_attention(attn: torch.Tensor, residual: torch.Tensor, o_proj: tuple, norm_weight: torch.Tensor, eps: float,
                   gate_up: tuple, down: tuple, config: dict | None = None, phases: int | None = None,
                   pdl: int | None = None, warmup: bool = False, front: tuple | None = None) -> torch.Tensor | None:
    """A Llama layer after attention, at batch 1, in one launch: o = attn @ o_proj; residual += o (in place, model
    dtype); x = rms_norm(residual) * norm_weight (kernels/fused_norm.py's Llama rounding); -> down(silu(gate) * up)
    of x [1, hidden]. attn [1, q_dim]; o_proj, gate_up, down as `mlp`'s weights; config adds T_O, BN_O (o_proj's
    tile). front = (the next layer's input norm weight, its eps, its qkv projection's weights): then also
    residual += that output (in place); x2 = rms_norm(residual) * weight; -> x2 @ qkv [1, N_qkv] instead (config
    T_Q, BN_Q)."""
    cfg = dict(DEFAULT, **(config or {}))
    if attn.dim() != 2 or attn.shape[0] != 1:
        raise ValueError(f"the W4A16 post-attention kernel takes attn [1, q_dim], got {tuple(attn.shape)}")
    hidden, inter = residual.shape[-1], gate_up[0].shape[1] // 2
    if residual.shape != (1, hidden) or not residual.is_contiguous() or residual.dtype != attn.dtype:
        raise ValueError(f"residual must be a contiguous [1, {hidden}] {attn.dtype} tensor, got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    if norm_weight.shape != (hidden,):
        raise ValueError(f"norm_weight must be [{hidden}], got {tuple(norm_weight.shape)}")
    gemvs = dict(o=_gemv("o_proj", o_proj, attn.shape[1], hidden, cfg["T_O"], cfg["BN_O"], cfg["H2"], attn.dtype,
                         False),
                 a=_gemv("gate_up", gate_up, hidden, 2 * inter, cfg["T_A"], cfg["BN_A"], cfg["H2"], attn.dtype, True),
                 b=_gemv("down", down, inter, hidden, cfg["T_B"], cfg["BN_B"], cfg["H2"], attn.dtype, False))
    nxt = None
    if front is not None:
        nw2, eps2, qkv_w = front
        if nw2.shape != (hidden,):
            raise ValueError(f"the next norm's weight must be [{hidden}], got {tuple(nw2.shape)}")
        gemvs["q"] = _gemv("qkv_proj", qkv_w, hidden, qkv_w[0].shape[1], cfg["T_Q"], cfg["BN_Q"], cfg["H2"],
                           attn.dtype, False)
        nxt = (nw2.contiguous(), eps2)
    return _run(attn.contiguous(), gemvs, (residual, norm_weight.contiguous(), eps), cfg, phases, pdl, warmup, nxt)


__all__ = ["mlp", "post_attention", "config_for", "TUNED", "reserve", "barrier", "errors", "clear_errors",
           "grid_barrier", "DEFAULT", "SPIN_MAX"]
