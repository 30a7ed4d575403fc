"""`gemv4`, the streamed M = 1 W4A16 GEMV: a fixed number of programs (a few per SM) each take an equal, contiguous
run of weight tiles across the whole [K, N] matrix and stream through it.

Why (bench/results/w4a16_2026-11-29_h200_r1.log): `gemv3`'s split-K grid gives each program a few tiles of one
column strip, so every program starts cold (its first load has nothing to overlap), the grid ends in a part-full
wave, and an int4 layer's GEMMs run at ~2 TB/s where a plain read of the same bytes runs at 3-3.7 TB/s. Here:
- the runs are equal (to a tile), so every SM finishes together and one wave holds the whole grid;
- a program's next tile is loaded while this one is computed, across column strips (no cold start between them).
(L2 prefetches running ahead, `L2_DIST` / `L2_PRE`, were measured slower and removed: docs/quantization.md.)
When a program leaves a column strip (or its run ends) it adds its float32 sums into the split-K workspace
(kernels/splitk.py) and counts the tiles it covered into the strip's counter; the program that brings the count
to the strip's tile count writes the output and zeroes the workspace and counter for the next call.

The arithmetic per tile is gemv3's (kernels/w4a16.py: zero point folded into the nibble decode, x pairs as int32
with XPAIR, a group's scale once per column); the same packed layout, group sizes and act-order. The nibble
decode both use lives here (w4a16.py imports this module).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels import splitk
from kernels.w4a16_half2 import tile_sums_h2


@triton.jit
def g3_nibble(words, hi, j: tl.constexpr, exp0):
    """gemv3's and gemv4's nibble j as the float 2^(23 - 4i) + q (kernels/w4a16.py's `_magic_nibble` without the
    subtraction, which the kernels do with the zero point)."""
    if j < 5:
        f = (words & (0xF << (4 * j))) | (exp0 - ((4 * j) << 23))
    else:
        f = (hi & (0xF << (4 * j - 20))) | (exp0 - ((4 * j - 20) << 23))
    return f.to(tl.float32, bitcast=True)


@triton.jit
def _fold_nibble(words, j: tl.constexpr, exp0):
    """gemv4's FOLD decode of nibble j: the word shifted so that the nibble sits at bits 12..15 (nibbles 1, 3, 5)
    or 16..19 (0, 2, 4, 6, 7), one and-or, and the float is 2^11 + q or 2^7 + q exactly. No subtraction per
    weight: the kernel sums (2^e + q) x and takes (2^e + z) sum(x) off once per group and column. Only these
    two positions: the offset's rounding error in float32 sums grows with 2^e, and at 2^11 it stays ~1e-4 of
    the result (a higher nibble position, 2^15 or more, would cost bf16-visible error)."""
    if j == 0:
        src = words << 16
    elif j == 1 or j == 2:
        src = words << 8
    elif j == 3 or j == 4:
        src = words
    elif j == 5 or j == 6:
        src = words >> 8
    else:
        src = words >> 12
    if j == 1 or j == 3 or j == 5:
        f = (src & 0xF000) | (exp0 - (12 << 23))
    else:
        f = (src & 0xF0000) | (exp0 - (16 << 23))
    return f.to(tl.float32, bitcast=True)


@triton.jit
def tile_sums(acc, words, words_o, k0, x_ptr, x2_ptr, perm_ptr, s_ptr, z_ptr, K, group_size, offs_n, n_mask, offs_r,
              stride_sg, exp0, hi_shift, S: tl.constexpr, JG: tl.constexpr, XPAIR: tl.constexpr, EVEN: tl.constexpr,
              HAS_PERM: tl.constexpr, FOLD: tl.constexpr):
    """gemv3's and gemv4's arithmetic on one tile: acc [BLOCK_N] += the tile's scaled sums. `words` [R, BLOCK_N]
    (with XPAIR the even words, `words_o` the odd ones, x read as int32 pairs at x2_ptr; without, words_o and
    x2_ptr are unused). k0: the input of nibble 0 of the tile's first word. A group's scale applies once per
    column when its JG nibbles are summed. Not FOLD: each product is (q - z) x, the zero point taken off in
    the nibble decode (`g3_nibble` less 2^(23 - 4i) + z, exact). FOLD: `_fold_nibble`'s 2^e + q times x as
    it is, and (2^e + z) sum(x) off once per group and column."""
    hi = words  # names only until nibble 5
    hi_o = words_o
    for j in tl.static_range(8):
        if j == 5 and not FOLD:  # here, not before the loop: the words are dead by now, so hi takes their registers
            hi = words >> hi_shift
            if XPAIR:
                hi_o = words_o >> hi_shift
        if j % JG == 0:  # a new group: its scale, and the five subtrahends 2^(23 - 4i) + z
            g = tl.minimum(k0 + j * S, K - 1) // group_size
            sc = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            zp = tl.load(z_ptr + g * stride_sg + offs_n, mask=n_mask, other=0).to(tl.float32)
            sub0, sub1, sub2 = zp + 8388608.0, zp + 524288.0, zp + 32768.0
            sub3, sub4 = zp + 2048.0, zp + 128.0
        sub = sub0 if j % 5 == 0 else sub1 if j % 5 == 1 else sub2 if j % 5 == 2 else sub3 if j % 5 == 3 else sub4
        if XPAIR:
            xw = tl.load(x2_ptr + (k0 + j * S) // 2 + offs_r)
            x_e = (xw << 16).to(tl.float32, bitcast=True)
            x_o = (xw & -65536).to(tl.float32, bitcast=True)
        else:
            k = k0 + j * S + offs_r
            if EVEN:
                cols = tl.load(perm_ptr + k) if HAS_PERM else k
                x_e = tl.load(x_ptr + cols).to(tl.float32)
            else:
                cols = tl.load(perm_ptr + k, mask=k < K, other=0) if HAS_PERM else k
                x_e = tl.load(x_ptr + cols, mask=k < K, other=0.0).to(tl.float32)
        if FOLD:  # (2^e + q) x summed as it is; the 2^e + z part comes off once per group, below
            prod = _fold_nibble(words, j, exp0) * x_e[:, None]
            xs = x_e
            if XPAIR:
                prod_o = _fold_nibble(words_o, j, exp0) * x_o[:, None]
                xs = x_e + x_o
            if j % JG == 0:
                xa = tl.zeros_like(xs)
                xb = tl.zeros_like(xs)
            if j == 1 or j == 3 or j == 5:  # nibble read at bits 12..15: 2^11 + q
                xa += xs
            else:  # at bits 16..19: 2^7 + q
                xb += xs
        else:
            prod = (g3_nibble(words, hi, j, exp0) - sub[None, :]) * x_e[:, None]  # (q - z) x
            if XPAIR:
                prod_o = (g3_nibble(words_o, hi_o, j, exp0) - sub[None, :]) * x_o[:, None]
        if j % JG == 0:
            part = prod
        else:
            part += prod
        if XPAIR:
            part += prod_o  # a separate add per product, so that each is one fused multiply-add
        if (j + 1) % JG == 0:  # the group's sums are complete
            if FOLD:
                acc += (tl.sum(part, axis=0) - sub3 * tl.sum(xa, axis=0) - sub4 * tl.sum(xb, axis=0)) * sc
            else:
                acc += tl.sum(part, axis=0) * sc
    return acc


@triton.jit
def strip_cols(col, offs, N, inter, BLOCK_N: tl.constexpr, GATED: tl.constexpr):
    """The matrix columns of strip `col`'s positions `offs`, and which exist. GATED: the strip's first half is
    gate columns col * BLOCK_N / 2 + .., its second half the up columns `inter` further on (N = 2 * inter)."""
    if GATED:
        c = col * (BLOCK_N // 2) + offs % (BLOCK_N // 2)
        return c + (offs // (BLOCK_N // 2)) * inter, c < inter
    else:
        c = col * BLOCK_N + offs
        return c, c < N


@triton.jit
def strip_done(acc, slot, n_mask, col, count, tpc, inter, out_ptr, ws_ptr, cnt_ptr, BLOCK_N: tl.constexpr,
                GATED: tl.constexpr):
    """Add this program's sums for column strip `col` (covering `count` of its tpc tiles) into the workspace at
    `slot` (col * BLOCK_N + position); the program that completes the strip's count writes it out and leaves
    workspace and counter zeroed. GATED: what it writes is silu(gate) * up for the strip's BLOCK_N / 2
    outputs, rounded as kernels/silu_mul.py rounds (gate and up to x's dtype first, as the unfused GEMM
    would store them)."""
    ws = ws_ptr + slot
    tl.atomic_add(ws, acc, mask=n_mask, sem="relaxed")
    tl.debug_barrier()  # every thread's adds are issued before the release below publishes them
    done = tl.atomic_add(cnt_ptr + col, count, sem="acq_rel")
    if done + count == tpc:
        dt = out_ptr.dtype.element_ty
        if GATED:
            half = tl.arange(0, BLOCK_N // 2)
            o = col * (BLOCK_N // 2) + half
            zero = tl.zeros((BLOCK_N // 2,), dtype=tl.float32)
            g = tl.atomic_add(ws_ptr + col * BLOCK_N + half, zero, mask=o < inter, sem="relaxed")  # read at L2
            u = tl.atomic_add(ws_ptr + col * BLOCK_N + BLOCK_N // 2 + half, zero, mask=o < inter, sem="relaxed")
            g = tl.where(o < inter, g, 0.0).to(dt).to(tl.float32)  # masked lanes hold no value
            u = tl.where(o < inter, u, 0.0)
            act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
            y = (act * u.to(dt).to(tl.float32)).to(dt)
            tl.store(out_ptr + o, y, mask=o < inter)
        else:
            total = tl.atomic_add(ws, tl.zeros_like(acc), mask=n_mask, sem="relaxed")  # read at L2, not L1
            tl.store(out_ptr + slot, tl.where(n_mask, total, 0.0).to(dt), mask=n_mask)
        tl.store(ws, tl.zeros_like(acc), mask=n_mask)
        tl.store(cnt_ptr + col, 0)


@triton.jit
def _w4a16_gemv4_kernel(
    x_ptr,  # [1, K] activations
    qw_ptr,  # [ceil(K / ROWS) * ROWS / 8, N] int32, kernels/w4a16.py's blocked layout, unit stride along N
    s_ptr, z_ptr,  # [G, N] scales, uint8 zero points (same strides)
    perm_ptr,  # [K] int32 (read when HAS_PERM)
    out_ptr,  # [1, N] in x's dtype; GATED: [1, inter]
    ws_ptr, cnt_ptr,  # split-K workspace: strips * BLOCK_N float32 sums, a counter per strip (zero on entry and exit)
    N, K, group_size, tpc, per_prog, total, stride_qk, stride_sg, exp0, hi_shift, inter,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, JG: tl.constexpr, HAS_PERM: tl.constexpr,
    PDL: tl.constexpr, EVEN: tl.constexpr, XPAIR: tl.constexpr, GATED: tl.constexpr, FOLD: tl.constexpr, H2: tl.constexpr, ASM: tl.constexpr,
):
    """Tiles are numbered column strip by strip: tile i is strip i // tpc, its T words (i % tpc) * T .. + T - 1
    (tpc = tiles per strip = blocks * ROWS / 8 / T). Program p runs tiles [p * per_prog, (p + 1) * per_prog).
    T, JG, XPAIR, EVEN, HAS_PERM as in gemv3.
    GATED (the fused gate/up projection of a SwiGLU MLP, N = 2 * inter): each strip takes the same BLOCK_N / 2
    columns of the gate half and of the up half (`_strip_cols`), so the program that completes it writes
    silu(gate) * up and the MLP skips its activation launch."""
    S: tl.constexpr = ROWS // 8
    H: tl.constexpr = S // T  # tiles per block
    R: tl.constexpr = T // 2 if XPAIR else T  # rows per word tile
    i_start = tl.program_id(0) * per_prog
    i_end = tl.minimum(total, i_start + per_prog)
    offs_b = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    step: tl.constexpr = 2 if XPAIR else 1
    col = i_start // tpc
    t = i_start - col * tpc
    wcols, ok = strip_cols(col, offs_b, N, inter, BLOCK_N, GATED)
    w_ptrs = qw_ptr + (t * T + step * offs_r)[:, None].to(tl.int64) * stride_qk + wcols[None, :]
    w_mask = (i_start < i_end) & ok[None, :]
    nxt = tl.load(w_ptrs, mask=w_mask)
    if XPAIR:
        nxt_o = tl.load(w_ptrs + stride_qk, mask=w_mask)
        x2_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    if PDL >= 2:
        gdc_launch_dependents()
    if PDL >= 1:
        gdc_wait()
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    count = 0
    for i in range(i_start, i_end):
        words = nxt
        if XPAIR:
            words_o = nxt_o
        offs_n, n_mask = strip_cols(col, offs_b, N, inter, BLOCK_N, GATED)
        i1 = i + 1  # the next tile, maybe in the next strip (counted along: no division per iteration)
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
        k0 = (t // H) * ROWS + (t % H) * T  # input of nibble 0 of the tile's first word
        if H2:  # packed-half arithmetic (kernels/w4a16_half2.py)
            acc = tile_sums_h2(acc, words, words_o if XPAIR else words, k0, x_ptr, x2_ptr if XPAIR else x_ptr,
                               perm_ptr, s_ptr, z_ptr, K, group_size, offs_n, n_mask, offs_r, stride_sg, S, XPAIR, EVEN,
                               HAS_PERM, ASM)
        else:
            acc = tile_sums(acc, words, words_o if XPAIR else words, k0, x_ptr, x2_ptr if XPAIR else x_ptr, perm_ptr,
                            s_ptr, z_ptr, K, group_size, offs_n, n_mask, offs_r, stride_sg, exp0, hi_shift, S, JG,
                            XPAIR, EVEN, HAS_PERM, FOLD)
        count += 1
        if (t == tpc - 1) | (i1 == i_end):  # the strip ends here, or the run does
            strip_done(acc, col * BLOCK_N + offs_b, n_mask, col, count, tpc, inter, out_ptr, ws_ptr, cnt_ptr,
                        BLOCK_N, GATED)
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            count = 0
        col = col1
        t = t1


def group_words(group_size: int, k: int, rows: int, whole: bool, kernel: str) -> int:
    """JG of the M = 1 GEMVs (gemv3, gemv4): how many of a tile's 8 packed words share one group's scale and
    zero; 8 when a group covers whole blocks of `rows` (or all of K)."""
    if whole:
        return 8
    if group_size % (rows // 8) == 0 and rows % group_size == 0:
        return group_size // (rows // 8)
    raise ValueError(f"the {kernel} kernel takes group sizes {rows // 8}, {rows // 4}, {rows // 2} or multiples of "
                     f"{rows} (K = {k}), got {group_size}")


def half2_mode(h2: int, jg: int, dtype: torch.dtype, xpair: bool) -> tuple[int, bool]:
    """(H2, XPAIR) for a launch asked for H2 = h2 (0: off; 1: one word per packed-half block; 2: two, the tile's even
    and odd words, which needs XPAIR's int32 x pairs). H2 needs each tile inside one group (jg 8) and 16-bit x;
    otherwise it is off and the launch runs `tile_sums` (so a tuned H2 config stays valid for any group size)."""
    if h2 not in (0, 1, 2):
        raise ValueError(f"H2 must be 0, 1 or 2, got {h2}")
    if not h2 or jg != 8 or dtype not in (torch.bfloat16, torch.float16):
        return 0, xpair
    if h2 == 2 and not xpair:
        return 1, False
    return h2, h2 == 2


def launch(x, qweight, scales, zeros, group_size, perm, rows, cfg, pdl, warmup, gated=False):
    """x [1, K] -> [1, N] with `gemv4` (kernels/w4a16.py's `w4a16` checks the arguments and calls this); gated:
    -> silu(gate) * up [1, N / 2] (N even). cfg: T, BLOCK_N, num_warps, XPAIR, PER_SM (programs per SM;
    default 8), FOLD (the zero point off per group, not per weight: `_fold_nibble`), maxnreg."""
    cfg = dict(cfg)
    k, n = x.shape[1], qweight.shape[1]
    t = min(cfg.pop("T", 8), rows // 8)
    bn = cfg.pop("BLOCK_N", 128)
    jg = group_words(group_size, k, rows, group_size % rows == 0 or group_size >= k, "gemv4")
    xpair = (cfg.pop("XPAIR", True) and x.dtype == torch.bfloat16 and perm is None and k % rows == 0
             and x.data_ptr() % 4 == 0)
    on_gpu = x.is_cuda
    per_sm = cfg.pop("PER_SM", 8)
    fold = bool(cfg.pop("FOLD", False))
    h2, xpair = half2_mode(cfg.pop("H2", 0), jg, x.dtype, xpair)
    tpc = -(-k // rows) * (rows // 8) // t
    inter = n // 2 if gated else n
    strips = triton.cdiv(inter, bn // 2) if gated else triton.cdiv(n, bn)
    total = strips * tpc
    programs = max(1, min(total, splitk.sm_count(x.device) * per_sm))
    per = triton.cdiv(total, programs)
    programs = triton.cdiv(total, per)
    out = torch.empty((1, inter), dtype=x.dtype, device=x.device)
    ws, cnt = splitk.workspace(x.device, strips * bn)
    args = (x, qweight, scales, zeros, perm if perm is not None else qweight, out, ws, cnt, n, k, group_size, tpc,
            per, total, qweight.stride(0), scales.stride(0), 150 << 23, 20, inter)
    consts = dict(cfg, ROWS=rows, BLOCK_N=bn, T=t, JG=jg, HAS_PERM=perm is not None, PDL=pdl, EVEN=k % rows == 0,
                  XPAIR=xpair, GATED=gated, FOLD=fold,
                  H2=h2, ASM=on_gpu)
    if pdl:
        consts["launch_pdl"] = True
    if warmup:
        _w4a16_gemv4_kernel.warmup(*args, grid=(programs,), **consts)
        return None
    _w4a16_gemv4_kernel[(programs,)](*args, **consts)
    return out


__all__ = ["launch", "half2_mode", "g3_nibble", "tile_sums", "strip_cols", "strip_done"]
