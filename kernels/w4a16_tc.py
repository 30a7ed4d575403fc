"""`tc`, the batch-1 W4A16 GEMV on tensor cores: weights re-laid out once at load so that each thread's int32 word is,
after a few bit operations, its A fragment of one mma.m16n8k16 (16 output columns by 16 inputs); x fills all 8
columns of the B fragment; float32 accumulation.

Why: the float32 GEMVs (`gemv3`, `gemv4`) spend ~4 instructions per weight (decode, a fused multiply-add each).
Here a word of 8 weights costs 3 shifts, 4 LOP3 (nibble pairs under the exponent of 128: the bf16 pair 128 + q,
exact) and one mma; (128 + z) sum(x) comes off per group and column (sum(x) from an all-ones mma), fp16 subtracts
1024 + z in the fragment: ~1.9 instructions per weight at NT = 4 by the sm_90 SASS. Products are exact and summed in
float32. Measured on the H200 (helper w4mma's rounds 1-2) it is correct but slower than H2 (kernels/w4a16_half2.py)
at M = 1: its one-warp programs are bound by bytes in flight. A version taking up to 64 rows of x (x's rows as the
B fragments' columns) gave wrong sums on the GPU while its interpreter stand-in agreed; it was taken out, and the
kernel takes one row.

Layout (`pack_tc`): [ceil(N / 16), ceil(K / 64), 128] int32. n-tile t (columns 16 t .. 16 t + 15), k-chunk c (inputs
64 c .. 64 c + 63, four k-tiles of 16), and 128 words: lane l's 4 consecutive words (one 16-byte load) are k-tiles
0..3 of the chunk. For lane l, g = l // 4, h = l % 4, a word's nibble i (bits 4i..4i+3) holds q[k, n] with
n = 16 t + g + 8 * (i odd) and k = 16 kt + 2 h + (i >= 4) + 8 * (i in 2, 3, 6, 7): so word >> 4i masked by 0x000F000F
is the fragment register a_i (nibbles i, i + 4: two consecutive inputs of one column). Zero rows and columns pad.

In the kernel the word tensor is [NT, 32, 4] (n-tiles, lanes, k-tiles): Triton gives each thread one lane's 4
contiguous words (the 16-byte vector), which is the layout the PTX needs (seen in the TTGIR; bench/w4a16.py checks
the result on the GPU). Group sizes that are multiples of 64 (a chunk inside one group), no act-order (x is read as
pairs), K and N any (padded). Without the PTX (the interpreter) the words are read back through the layout and
multiplied in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels import splitk
from kernels.splitk import splitk_store
from kernels.w4a16_stream import strip_done


def _mma_asm(dtype: str, magic: int, sub: bool) -> str:
    """PTX for 4 words (4 k-tiles), chained into one accumulator: operands $0..$3 out, $4..$7 words, $8..$11 and
    $12..$15 x pairs (inputs 2h, 2h + 1 and 2h + 8, 2h + 9 of each k-tile), $16 and $20 the pairs magic + z of rows g
    and g + 8 (taken off when `sub`; else the kernel takes (magic + z) sum(x) off per group), $24..$27 the
    accumulator in."""
    lines = ["{", ".reg .b32 t_a<4>;", ".reg .b32 t_s<3>;"]
    for j in range(4):
        w = f"${4 + j}"
        lines += [f"shr.u32 t_s0, {w}, 4;", f"shr.u32 t_s1, {w}, 8;", f"shr.u32 t_s2, {w}, 12;",
                  f"lop3.b32 t_a0, {w}, 0x000f000f, {magic:#x}, 0xea;"]
        lines += [f"lop3.b32 t_a{i}, t_s{i - 1}, 0x000f000f, {magic:#x}, 0xea;" for i in (1, 2, 3)]
        if sub:
            lines += [f"sub.rn.{dtype}x2 t_a0, t_a0, $16;", f"sub.rn.{dtype}x2 t_a1, t_a1, $20;",
                      f"sub.rn.{dtype}x2 t_a2, t_a2, $16;", f"sub.rn.{dtype}x2 t_a3, t_a3, $20;"]
        acc = "{$24, $25, $26, $27}" if j == 0 else "{$0, $1, $2, $3}"
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{dtype}.{dtype}.f32 {{$0, $1, $2, $3}}, "
                     f"{{t_a0, t_a1, t_a2, t_a3}}, {{${8 + j}, ${12 + j}}}, {acc};")
    lines.append("}")
    return "\n".join(lines)


def _ones_asm(dtype: str, one: int) -> str:
    """PTX: the same 4 k-tiles' x pairs ($4..$7, $8..$11) times an all-ones A, chained onto $12..$15: each output is
    the running sum of its token's x over the k-tiles (FOLD's sum(x))."""
    lines = ["{", ".reg .b32 t_one;", f"mov.b32 t_one, {one:#x};"]
    for j in range(4):
        acc = "{$12, $13, $14, $15}" if j == 0 else "{$0, $1, $2, $3}"
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{dtype}.{dtype}.f32 {{$0, $1, $2, $3}}, "
                     f"{{t_one, t_one, t_one, t_one}}, {{${4 + j}, ${8 + j}}}, {acc};")
    lines.append("}")
    return "\n".join(lines)


MAGIC = {"bf16": 0x43004300, "f16": 0x64006400}
"""The exponent bits of 128 (bf16) or 1024 (f16) in both halves; a nibble in the low mantissa bits reads as that + q."""
_ASM_BF16 = tl.constexpr(_mma_asm("bf16", MAGIC["bf16"], False))  # FOLD: 128 + q, (128 + z) sum(x) off per group
_ASM_F16 = tl.constexpr(_mma_asm("f16", MAGIC["f16"], True))  # 1024 + q would cost float32 precision: q - z
_ONES_BF16 = tl.constexpr(_ones_asm("bf16", 0x3F803F80))
_CONS = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 24))
_CONS_ONES = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 12))


@triton.jit
def _chunk_ref(qw_ptr, tile, stride_nt, c, x_ptr, K, z_rows):
    """The interpreter's stand-in for the PTX on chunk c: D [NT, 16] float32 (columns 16 tile + row), from the words
    read back through pack_tc's layout (row = g + 8 odd, input 16 kt + 8 hi + 2 h + lo is nibble odd + 2 hi + 4 lo of
    lane 4 g + h's word kt), (q - z) x summed in float32."""
    row = tl.arange(0, 16)[None, :, None]
    kk = tl.arange(0, 64)[None, None, :]
    kt, k16 = kk // 16, kk % 16
    hi, rem = k16 // 8, k16 % 8
    nib = row // 8 + 2 * hi + 4 * (rem % 2)
    lane = 4 * (row % 8) + rem // 2
    words = tl.load(qw_ptr + tile.to(tl.int64) * stride_nt + c * 128 + lane * 4 + kt)  # [NT, 16, 64]
    a = ((words >> (4 * nib)) & 0xF) - z_rows  # z_rows [NT, 16, 1]
    k = c * 64 + kk
    xv = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)  # [1, 1, 64]
    return tl.sum(a.to(tl.float32) * xv, axis=2)


@triton.jit
def _x_tile(x2_ptr, c, hq, K, EVEN: tl.constexpr):
    """[1, 1, 32, 4] int32 (x2_ptr [1, 1, 32, 1]: x as int32 pairs): for lane l and k-tile j of chunk c, the pair of x
    at inputs 64 c + 16 j + 2 h (h = l % 4 in hq [1, 32, 1]) and the next.
    Loaded per k-tile (one pair per thread, lanes across the warp) and joined along the last dimension, so that each
    thread holds its lane's 4 pairs as the PTX needs them (one load of [.., 32, 4] would be laid out along its 4
    contiguous lanes instead)."""
    if EVEN:
        x0 = tl.load(x2_ptr + c * 32 + hq)
        x1 = tl.load(x2_ptr + c * 32 + 8 + hq)
        x2 = tl.load(x2_ptr + c * 32 + 16 + hq)
        x3 = tl.load(x2_ptr + c * 32 + 24 + hq)
    else:  # K even: a pair is in or out whole
        x0 = tl.load(x2_ptr + c * 32 + hq, mask=2 * (c * 32 + hq) < K, other=0)
        x1 = tl.load(x2_ptr + c * 32 + 8 + hq, mask=2 * (c * 32 + 8 + hq) < K, other=0)
        x2 = tl.load(x2_ptr + c * 32 + 16 + hq, mask=2 * (c * 32 + 16 + hq) < K, other=0)
        x3 = tl.load(x2_ptr + c * 32 + 24 + hq, mask=2 * (c * 32 + 24 + hq) < K, other=0)
    return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (1, 1, 32, 4))  # [.., q, p] = x_{2q + p}


@triton.jit
def _words(w_base, c, c_last, tiles_ok, FULL: tl.constexpr):
    """The [NT, 32, 4] words of chunk c (clamped to the split's last chunk: a read past it is in bounds, unused)."""
    if FULL:
        return tl.load(w_base + tl.minimum(c, c_last) * 128)
    return tl.load(w_base + tl.minimum(c, c_last) * 128, mask=tiles_ok, other=0)


@triton.jit
def _w4a16_tc_kernel(
    x_ptr,  # [1, K] bf16 or fp16, 4-byte aligned (read as int32 pairs)
    qw_ptr,  # [ceil(N / 16), ceil(K / 64), 128] int32: pack_tc's layout
    s_ptr, z_ptr,  # [G, N] scales, uint8 zero points (same strides)
    out_ptr, ws_ptr, cnt_ptr,  # out [1, N] (GATED: [1, inter]); split-K workspace (kernels/splitk.py)
    N, K, group_size, groups_per_split, split_k, stride_nt, stride_sg, inter,
    NT: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr,
    EVEN: tl.constexpr, FULL: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr, GATED: tl.constexpr,
    DEPTH: tl.constexpr,
):
    """Program (pid_n, pid_k): NT n-tiles (GATED: NT / 2 gate tiles and the same up tiles, `inter` columns on), over
    the groups [pid_k * groups_per_split, ..) of K. x fills all 8 columns of the B fragment. Per group: a fresh
    accumulator chained through the group's chunks by the PTX, then acc += s * D per column; bf16 (FOLD): D sums
    (128 + q) x and (128 + z) sum(x) comes off, sum(x) from an all-ones mma on the same x fragments; fp16: the
    fragments hold q - z (exact). FULL: every program's n-tiles exist (no masks
    on the words). DEPTH: chunks of words in flight ahead of the one computed (1 to 4). PDL as in gemv3 (the first
    chunks' words are read before the wait)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, NT)[:, None, None]
    lane = tl.arange(0, 32)[None, :, None]
    j = tl.arange(0, 4)[None, None, :]
    if GATED:  # rows NT / 2 .. of the program are the up tiles of the same columns
        tile = pid_n * (NT // 2) + r % (NT // 2) + (r // (NT // 2)) * (inter // 16)
        tiles_ok = (pid_n * (NT // 2) + r % (NT // 2)) < tl.cdiv(inter, 16)
    else:
        tile = pid_n * NT + r
        tiles_ok = tile < tl.cdiv(N, 16)
    g = lane // 4
    hq = (lane * 5) % 4  # lane % 4, written so that the compiler sees no contiguity across lanes (see _x_tile)
    n_g = tile * 16 + g  # [NT, 32, 1]: the columns of the lane's fragment rows g and g + 8
    ok_g = tiles_ok & (n_g < N)
    ok_g8 = tiles_ok & (n_g + 8 < N)
    chunks = tl.cdiv(K, 64)
    cpg = tl.cdiv(tl.minimum(group_size, K), 64)  # chunks per group
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(tl.cdiv(K, group_size), g_start + groups_per_split)
    c_last = tl.minimum(chunks, g_end * cpg) - 1  # the split's last chunk (prefetches stop there)
    w_base = qw_ptr + tile.to(tl.int64) * stride_nt + lane * 4 + j  # [NT, 32, 4], + chunk * 128
    x2_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    x2_rows = x2_ptr + tl.zeros((1, 1, 32, 1), dtype=tl.int32)
    c0 = g_start * cpg
    nxt = _words(w_base, c0, c_last, tiles_ok, FULL)  # a ring of DEPTH chunks in flight: nxt, nxt2, nxt3, nxt4
    nxt2 = _words(w_base, c0 + 1, c_last, tiles_ok, FULL) if DEPTH >= 2 else nxt
    nxt3 = _words(w_base, c0 + 2, c_last, tiles_ok, FULL) if DEPTH >= 3 else nxt
    nxt4 = _words(w_base, c0 + 3, c_last, tiles_ok, FULL) if DEPTH >= 4 else nxt
    if PDL >= 2:
        gdc_launch_dependents()
    if PDL >= 1:
        gdc_wait()
    acc1 = tl.zeros((NT, 32, 2), dtype=tl.float32)  # [.., 0] row g, [.., 1] row g + 8 of the lane's fragment
    ref = tl.zeros((NT, 16), dtype=tl.float32)  # the interpreter's [tile, row] sums
    s_g_ptr, z_g_ptr = s_ptr + n_g, z_ptr + n_g
    for grp in range(g_start, g_end):
        if FULL:
            sc_g = tl.load(s_g_ptr + grp * stride_sg).to(tl.float32)
            sc_g8 = tl.load(s_g_ptr + grp * stride_sg + 8).to(tl.float32)
            z_g = tl.load(z_g_ptr + grp * stride_sg).to(tl.int32)
            z_g8 = tl.load(z_g_ptr + grp * stride_sg + 8).to(tl.int32)
        else:
            sc_g = tl.load(s_g_ptr + grp * stride_sg, mask=ok_g, other=0.0).to(tl.float32)
            sc_g8 = tl.load(s_g_ptr + grp * stride_sg + 8, mask=ok_g8, other=0.0).to(tl.float32)
            z_g = tl.load(z_g_ptr + grp * stride_sg, mask=ok_g, other=0).to(tl.int32)
            z_g8 = tl.load(z_g_ptr + grp * stride_sg + 8, mask=ok_g8, other=0).to(tl.int32)
        zz = (z_g + 0x6400) * 0x10001  # f16: the pairs (1024 + z, 1024 + z) of rows g, g + 8
        zz8 = (z_g8 + 0x6400) * 0x10001
        zz, zz8 = tl.expand_dims(zz, 0), tl.expand_dims(zz8, 0)
        d = tl.zeros((1, NT, 32, 4), dtype=tl.float32)
        xs = tl.zeros((1, 1, 32, 4), dtype=tl.float32)
        if not ASM:
            rows16 = tile * 16 + tl.arange(0, 16)[None, :, None]
            z_rows = tl.load(z_ptr + grp * stride_sg + rows16, mask=tiles_ok & (rows16 < N), other=0).to(tl.int32)
            e = tl.zeros((NT, 16), dtype=tl.float32)
        for c in range(grp * cpg, tl.minimum(chunks, (grp + 1) * cpg)):
            words = nxt
            nxt_new = _words(w_base, c + DEPTH, c_last, tiles_ok, FULL)
            if DEPTH == 1:
                nxt = nxt_new
            elif DEPTH == 2:
                nxt, nxt2 = nxt2, nxt_new
            elif DEPTH == 3:
                nxt, nxt2, nxt3 = nxt2, nxt3, nxt_new
            else:
                nxt, nxt2, nxt3, nxt4 = nxt2, nxt3, nxt4, nxt_new
            if ASM:
                xa = _x_tile(x2_rows, c, hq, K, EVEN)
                xb = _x_tile(x2_rows + 4, c, hq, K - 8, EVEN)
                if BF16:
                    d = tl.inline_asm_elementwise(_ASM_BF16, _CONS, [tl.expand_dims(words, 0), xa, xb, zz, zz8, d],
                                                  dtype=tl.float32, is_pure=True, pack=4)
                    xs = tl.inline_asm_elementwise(_ONES_BF16, _CONS_ONES, [xa, xb, xs], dtype=tl.float32,
                                                   is_pure=True, pack=4)
                else:
                    d = tl.inline_asm_elementwise(_ASM_F16, _CONS, [tl.expand_dims(words, 0), xa, xb, zz, zz8, d],
                                                  dtype=tl.float32, is_pure=True, pack=4)
            else:
                e += _chunk_ref(qw_ptr, tile, stride_nt, c, x_ptr, K, z_rows)
        if ASM:  # the fragment's c0, c1 are row g, c2, c3 row g + 8 (every column is x): keep c0 and c2
            d2 = tl.split(tl.reshape(d, (NT, 32, 2, 2)))[0]
            if BF16:
                xs2 = tl.split(tl.reshape(xs, (1, 32, 2, 2)))[0]
                z2 = tl.reshape(tl.join(z_g, z_g8), (NT, 32, 2)).to(tl.float32) + 128.0
                d2 -= z2 * xs2
            acc1 += d2 * tl.reshape(tl.join(sc_g, sc_g8), (NT, 32, 2))
        else:
            s_rows = tl.load(s_ptr + grp * stride_sg + rows16, mask=tiles_ok & (rows16 < N), other=0.0)
            ref += e * tl.reshape(s_rows, (NT, 16)).to(tl.float32)
    if ASM:  # rows g and g + 8 of each n-tile: lane h = 0's (every lane of a quad holds the same sums)
        acc4 = tl.where(tl.arange(0, 4)[None, None, :, None] == 0, tl.reshape(acc1, (NT, 8, 4, 2)), 0.0)
        a4 = tl.arange(0, 2)[None, None, None, :]
        y_lo = tl.sum(tl.sum(tl.where(a4 == 0, acc4, 0.0), axis=3), axis=2)  # [NT, 8]
        y_hi = tl.sum(tl.sum(tl.where(a4 == 1, acc4, 0.0), axis=3), axis=2)
        y = tl.reshape(tl.permute(tl.join(y_lo, y_hi), (0, 2, 1)), (NT * 16,))  # position 16 r + 8 hi + g
    else:
        y = tl.reshape(ref, (NT * 16,))
    offs = tl.arange(0, NT * 16)
    if GATED:  # strip pid_n: gate columns pid_n * NT * 8 + .., then the same up columns (kernels/w4a16_stream.py)
        col = pid_n * (NT * 8) + offs % (NT * 8)
        strip_done(y, pid_n * (NT * 16) + offs, col < inter, pid_n, 1, split_k, inter, out_ptr, ws_ptr, cnt_ptr,
                   NT * 16, GATED)
    else:
        splitk_store(y[None, :], tl.arange(0, 1), pid_n * (NT * 16) + offs, 1, N, out_ptr, 0, 0, ws_ptr, cnt_ptr,
                     pid_n, split_k, SPLIT, True)


def usable(x: torch.Tensor, group_size: int, k: int, perm, gated: bool, n: int) -> bool:
    """Whether `tc` can run this call: one row of bf16 or fp16 x (4-byte aligned), no act-order, a group size that is
    a multiple of 64 (or one group over K), K even; gated: inter a multiple of 16."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and perm is None and (group_size % 64 == 0 or group_size >= k) and k % 2 == 0 and x.data_ptr() % 4 == 0
            and x.stride(1) == 1 and (not gated or (n // 2) % 16 == 0))


def launch(x, qtc, scales, zeros, group_size, cfg, pdl, warmup, gated=False):
    """x [1, K] -> [1, N] (gated: silu(gate) * up [1, N / 2]) from pack_tc's `qtc`. cfg: NT
    (n-tiles per program, default 4; even when gated), DEPTH (chunks in flight, 1 to 4, default 1), num_warps
    (default 1), SPLIT_K (default: about 8 programs per SM), maxnreg."""
    cfg = dict(cfg)
    m, k = x.shape
    if m != 1:
        raise ValueError(f"the tc kernel takes one row of x, got {m}")
    n = scales.shape[1]
    nt = cfg.pop("NT", 4)
    group = min(group_size, k)
    groups = -(-k // group)
    inter = n // 2 if gated else n
    tiles = triton.cdiv(inter, 8 * nt) if gated else triton.cdiv(n, 16 * nt)
    split = cfg.pop("SPLIT_K", None)
    if split is None:
        split = splitk.split_for(tiles, groups, splitk.sm_count(x.device), 8, max_split=128, min_blocks=1)
    per = triton.cdiv(groups, split)
    split = triton.cdiv(groups, per)
    if gated:
        out = torch.empty((1, inter), dtype=x.dtype, device=x.device)
        ws, cnt = splitk.workspace(x.device, tiles * nt * 16)
    else:
        out, ws, cnt = splitk.outputs(x, 1, n, split, True)
    args = (x, qtc, scales, zeros, out, ws, cnt, n, k, group, per, split, qtc.stride(0), scales.stride(0), inter)
    full = (inter % (8 * nt) == 0) if gated else (n % (16 * nt) == 0)
    depth = cfg.pop("DEPTH", 1)
    consts = dict(cfg, NT=nt, DEPTH=depth, BF16=x.dtype == torch.bfloat16, ASM=x.is_cuda,
                  EVEN=k % 64 == 0, FULL=full, SPLIT=split > 1, PDL=pdl, GATED=gated)
    consts.setdefault("num_warps", 1)
    if pdl:
        consts["launch_pdl"] = True
    if warmup:
        _w4a16_tc_kernel.warmup(*args, grid=(tiles, split), **consts)
        return None
    _w4a16_tc_kernel[(tiles, split)](*args, **consts)
    return out


_NIBBLE_ROW = (0, 8, 0, 8, 0, 8, 0, 8)  # nibble i's fragment row offset (g + 8 for odd i)
_NIBBLE_K = (0, 0, 8, 8, 1, 1, 9, 9)  # nibble i's input offset from 2h


def pack_tc(q_kn: torch.Tensor) -> torch.Tensor:
    """[K, N] values 0..15 (rows in the order x is read) -> [ceil(N / 16), ceil(K / 64), 128] int32 (the module
    docstring's layout)."""
    k, n = q_kn.shape
    kc, nt = -(-k // 64), -(-n // 16)
    q = torch.nn.functional.pad(q_kn.to(torch.int32), (0, nt * 16 - n, 0, kc * 64 - k))
    a = q.t().reshape(nt, 16, kc, 4, 16).permute(0, 2, 3, 1, 4)  # [nt, kc, kt, row, kk]
    dev = q.device
    g = torch.arange(8, device=dev)[:, None, None]
    h = torch.arange(4, device=dev)[None, :, None]
    rows = g + torch.tensor(_NIBBLE_ROW, device=dev)[None, None, :]  # [8, 1, 8]
    kks = 2 * h + torch.tensor(_NIBBLE_K, device=dev)[None, None, :]  # [1, 4, 8]
    rows, kks = torch.broadcast_tensors(rows, kks)  # [8 g, 4 h, 8 i]
    vals = a[:, :, :, rows, kks]  # [nt, kc, kt, g, h, i]
    shifts = (4 * torch.arange(8, device=dev, dtype=torch.int32))
    words = (vals << shifts).sum(-1, dtype=torch.int64)  # nibbles in disjoint bits: the sum is the or
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.permute(0, 1, 3, 4, 2).reshape(nt, kc, 128).contiguous()  # lane (g, h) then its 4 k-tiles


__all__ = ["launch", "pack_tc", "usable"]
