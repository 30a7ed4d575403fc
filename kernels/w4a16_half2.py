"""H2, the packed-half decode of the M = 1 W4A16 GEMVs (`gemv3`, `gemv4`): a tile's arithmetic in f16x2 pairs, about
two instructions per weight where the float32 decode (kernels/w4a16_stream.py's `tile_sums`) spends 3.4-4.3.

Per int32 word (8 nibbles, rows k0 + 16 j + r of kernels/w4a16.py's layout) one inline-PTX block does:
- 4 LOP3 (and 1 shift): (w & 0x000F000F) | 0x4C004C00 is the f16 pair (16 + q0/64, 16 + q4/64) (the ulp of 16 is
  1/64); the nibbles at bits 4..7 / 20..23 under the exponent of 1.0 read as 1 + q/64; w >> 8 gives nibbles 2, 6
  and 3, 7.
- 4 HSUB2: minus (16 + z/64) or (1 + z/64) in both halves, exact: each half is (q - z)/64.
- 4 HFMA2: the products with x's pairs (x[k0 + 16 j + r], x[k0 + 16 (j + 4) + r]) summed in float16, then the two
  halves converted and added in float32. So each float16 sum has 4 products (8 with PAIR: two words per block).
The 1/64 is taken back with the scale (x 64) once per group and column. It keeps the float16 sums in range: a
half's sum is at most 8 * 15 * |x| / 64, so |x| up to ~35,000 fits (bf16 activations past that would overflow).
Rounding: x to float16 is exact for bf16 values from 2^-14 to that bound (11-bit mantissa); products and the 4 or
8 term sums round to float16 (relative 2^-11 each), below bf16 output's own rounding (2^-8).

Needs a group to cover the tile's 8 nibbles (a group size that is a multiple of the block, or one group over K),
and x in bf16 or float16 (float32 x would lose precision; the kernels fall back to `tile_sums` otherwise). ASM: the
PTX (CUDA); without it (the interpreter) the same float16 arithmetic in Triton ops, one half at a time.
"""

from __future__ import annotations

import triton
import triton.language as tl

X_SHIFT = 6
"""The decoded weights are (q - z) / 2^X_SHIFT; the scale is multiplied by 2^X_SHIFT (see the module docstring)."""

_WORD = """
    lop3.b32 %a0, {w}, 0x000f000f, 0x4c004c00, 0xea;
    lop3.b32 %a1, {w}, 0x00f000f0, 0x3c003c00, 0xea;
    shr.u32 %s, {w}, 8;
    lop3.b32 %a2, %s, 0x000f000f, 0x4c004c00, 0xea;
    lop3.b32 %a3, %s, 0x00f000f0, 0x3c003c00, 0xea;
    sub.f16x2 %a0, %a0, {zlo};
    sub.f16x2 %a1, %a1, {zhi};
    sub.f16x2 %a2, %a2, {zlo};
    sub.f16x2 %a3, %a3, {zhi};
    {first}
    fma.rn.f16x2 %acc, %a1, {x1}, %acc;
    fma.rn.f16x2 %acc, %a2, {x2}, %acc;
    fma.rn.f16x2 %acc, %a3, {x3}, %acc;
"""


def _asm(words: int) -> str:
    """PTX for `words` (1 or 2) words: operands $1.. are the words, then 4 x pairs per word, then zlo, zhi."""
    xb, zb = 1 + words, 1 + 5 * words
    body = []
    for i in range(words):
        xs = [f"${xb + 4 * i + j}" for j in range(4)]
        first = f"mul.rn.f16x2 %acc, %a0, {xs[0]};" if i == 0 else f"fma.rn.f16x2 %acc, %a0, {xs[0]}, %acc;"
        body.append(_WORD.format(w=f"${1 + i}", zlo=f"${zb}", zhi=f"${zb + 1}", first=first, x1=xs[1], x2=xs[2],
                                 x3=xs[3]).replace("%", "h2_"))
    return ("{\n.reg .b32 h2_a0, h2_a1, h2_a2, h2_a3, h2_s, h2_acc;\n.reg .b16 h2_lo, h2_hi;\n.reg .f32 h2_fl, h2_fh;\n"
            + "".join(body) + "mov.b32 {h2_lo, h2_hi}, h2_acc;\ncvt.f32.f16 h2_fl, h2_lo;\ncvt.f32.f16 h2_fh, h2_hi;\n"
            "add.f32 $0, h2_fl, h2_fh;\n}")


ASM1, ASM2 = tl.constexpr(_asm(1)), tl.constexpr(_asm(2))
CONS1 = tl.constexpr("=r," + ",".join(["r"] * 7))
CONS2 = tl.constexpr("=r," + ",".join(["r"] * 12))
_XS = tl.constexpr(1.0 / (1 << X_SHIFT))
_SC = tl.constexpr(float(1 << X_SHIFT))


@triton.jit
def _pack(lo, hi, ASM: tl.constexpr):
    """Two float32 tensors -> int32 f16x2 (lo in bits 0..15), rounded to nearest."""
    if ASM:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [lo, hi], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi16 = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return lo16 | (hi16 << 16)


@triton.jit
def _half(pair, HI: tl.constexpr):
    """The float16 in the low (or high) half of an int32 f16x2 tensor."""
    if HI:
        bits = (pair >> 16) & 0xFFFF
    else:
        bits = pair & 0xFFFF
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _word_sums_ref(words, xp0, xp1, xp2, xp3, z, HI: tl.constexpr, acc):
    """The interpreter's stand-in for one word of the PTX, one half: nibbles 4 HI .. 4 HI + 3, (q - z) x summed in
    float16 onto acc (float16)."""
    for j in tl.static_range(4):
        xp = xp0 if j == 0 else xp1 if j == 1 else xp2 if j == 2 else xp3
        q = (words >> (4 * (j + 4 * HI))) & 0xF
        d = (q - z).to(tl.float16) * _XS
        acc = acc + d * _half(xp, HI)
    return acc


@triton.jit
def _x_pairs(x_ptr, x2_ptr, perm_ptr, k0, offs_r, K, S: tl.constexpr, PAIR: tl.constexpr, EVEN: tl.constexpr,
             HAS_PERM: tl.constexpr, ODD: tl.constexpr, ASM: tl.constexpr):
    """x's f16x2 pairs (nibble j, nibble j + 4) for j = 0..3, as [R] int32 tensors: for rows
    k0 + 16 j + offs_r, or with PAIR the even (ODD False) or odd rows of int32-loaded bf16 pairs."""
    out0 = tl.zeros((offs_r.shape[0],), dtype=tl.int32)
    out1 = out0
    out2 = out0
    out3 = out0
    lo = tl.zeros((offs_r.shape[0],), dtype=tl.float32)
    for j in tl.static_range(4):
        for h in tl.static_range(2):
            jj = j + 4 * h
            if PAIR:
                xw = tl.load(x2_ptr + (k0 + jj * S) // 2 + offs_r)
                if ODD:
                    xv = (xw & -65536).to(tl.float32, bitcast=True)
                else:
                    xv = (xw << 16).to(tl.float32, bitcast=True)
            else:
                k = k0 + jj * S + offs_r
                if EVEN:
                    cols = tl.load(perm_ptr + k) if HAS_PERM else k
                    xv = tl.load(x_ptr + cols).to(tl.float32)
                else:
                    cols = tl.load(perm_ptr + k, mask=k < K, other=0) if HAS_PERM else k
                    xv = tl.load(x_ptr + cols, mask=k < K, other=0.0).to(tl.float32)
            if h == 0:
                lo = xv
            else:
                p = _pack(lo, xv, ASM)
                if j == 0:
                    out0 = p
                elif j == 1:
                    out1 = p
                elif j == 2:
                    out2 = p
                else:
                    out3 = p
    return out0, out1, out2, out3


@triton.jit
def tile_sums_h2(acc, words, words_o, k0, x_ptr, x2_ptr, perm_ptr, s_ptr, z_ptr, K, group_size, offs_n, n_mask,
                 offs_r, stride_sg, S: tl.constexpr, PAIR: tl.constexpr, EVEN: tl.constexpr, HAS_PERM: tl.constexpr,
                 ASM: tl.constexpr):
    """acc [BLOCK_N] += the tile's sums, scaled: `words` [R, BLOCK_N] (with PAIR the tile's even words, `words_o` the
    odd ones, x read as int32 pairs at x2_ptr, and one PTX block takes a word of each). The tile lies in one group.
    k0 is a multiple of the tile's T words (2 R with PAIR, else R): said to the compiler, so x loads as vectors."""
    k0 = tl.multiple_of(k0, offs_r.shape[0] * (2 if PAIR else 1))
    g = tl.minimum(k0, K - 1) // group_size
    sc = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32) * _SC
    zp = tl.load(z_ptr + g * stride_sg + offs_n, mask=n_mask, other=0).to(tl.int32)
    a0, a1, a2, a3 = _x_pairs(x_ptr, x2_ptr, perm_ptr, k0, offs_r, K, S, PAIR, EVEN, HAS_PERM, False, ASM)
    if PAIR:
        b0, b1, b2, b3 = _x_pairs(x_ptr, x2_ptr, perm_ptr, k0, offs_r, K, S, PAIR, EVEN, HAS_PERM, True, ASM)
    if ASM:
        zlo = ((0x4C00 + zp) * 0x10001)[None, :]
        zhi = ((0x3C00 + 16 * zp) * 0x10001)[None, :]
        if PAIR:
            part = tl.inline_asm_elementwise(ASM2, CONS2, [words, words_o, a0[:, None], a1[:, None], a2[:, None],
                                                           a3[:, None], b0[:, None], b1[:, None], b2[:, None],
                                                           b3[:, None], zlo, zhi],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            part = tl.inline_asm_elementwise(ASM1, CONS1, [words, a0[:, None], a1[:, None], a2[:, None], a3[:, None],
                                                           zlo, zhi], dtype=tl.float32, is_pure=True, pack=1)
    else:
        z = zp[None, :]
        lo = tl.zeros(words.shape, dtype=tl.float16)
        hi = tl.zeros(words.shape, dtype=tl.float16)
        lo = _word_sums_ref(words, a0[:, None], a1[:, None], a2[:, None], a3[:, None], z, False, lo)
        hi = _word_sums_ref(words, a0[:, None], a1[:, None], a2[:, None], a3[:, None], z, True, hi)
        if PAIR:
            lo = _word_sums_ref(words_o, b0[:, None], b1[:, None], b2[:, None], b3[:, None], z, False, lo)
            hi = _word_sums_ref(words_o, b0[:, None], b1[:, None], b2[:, None], b3[:, None], z, True, hi)
        part = lo.to(tl.float32) + hi.to(tl.float32)
    return acc + tl.sum(part, axis=0) * sc


__all__ = ["tile_sums_h2", "X_SHIFT"]
