"""W4A16 GEMM: y = x @ dequant(qweight), 4-bit weights unpacked in registers, all kernels on one layout:
batch-1 GEMVs (`gemv3`, the decode default; `gemv4` in kernels/w4a16_stream.py; `gemv1`, `gemv2` kept as swept
alternatives), a GEMV for a few rows, a tensor-core kernel for larger M, and dequantize-then-cuBLAS for large M;
they split K through kernels/splitk.py when N alone leaves SMs idle.

Layout (`pack_int4`; services/engine/model/quantization/int4.py repacks GPTQ, AWQ and compressed-tensors
into it once at load): input rows in blocks of R = `block_rows(K)` (128, or 64 where that pads K less;
zero rows pad K to a multiple of R); block b is S = R / 8 int32 words per column, qweight[S b + p, n],
whose nibble j (bits 4j..4j+3) holds row R b + S j + p. So shifting a block's [S, N] words by 4j and
masking gives the [S, N] slab of rows R b + S j .. + S - 1, contiguous in x: no permute, no gather. The
tensor-core kernel's per-nibble dots need S = 16 (R = 128). Group g = k // group_size and
w[k, n] = (q - zeros[g, n]) * scales[g, n]. With act-order the rows were sorted by group at load and
`perm[k]` is the column of x that row k multiplies. Host-side work is shape checks and one allocation,
so a call can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl as pdl_launch
from kernels import splitk, w4a16_stream
from kernels.w4a16_stream import g3_nibble as _g3_nibble
from kernels.w4a16_half2 import tile_sums_h2
from kernels.w4a16_stream import strip_cols, strip_done, tile_sums
from kernels.splitk import splitk_store
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

def block_rows(k: int) -> int:
    """Rows per packed block for K inputs: 128 (8 nibbles x 16 words), or 64 when K % 128 is 1..64, where
    128-row blocks would pad K by more (K = 64, or a tensor-parallel slice such as 18944 / 8)."""
    return 64 if 0 < k % 128 <= 64 else 128


@triton.jit
def _nibble_unit(words, j: tl.constexpr):
    """Nibble j (q, 0..15) of each int32 word as the float32 1 + q / 16, exactly: one shift moves the nibble
    to the top of float32's mantissa and one and-or (a single LOP3) sets the exponent of 1.0. No int-to-float
    conversion (quarter rate on the GPU) and no subtraction: the scale arithmetic absorbs the offset,
    (q - z) s = v (16 s) - (16 + z) s for v = 1 + q / 16, exact in float32 for 16-bit s."""
    if 4 * j <= 19:
        t = words << (19 - 4 * j)
    else:
        t = words >> (4 * j - 19)
    return ((t & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _x_slab(x_ptr, perm_ptr, offs_m, m_mask, stride_xm, k, K, HAS_PERM: tl.constexpr):
    """x[offs_m, k] [BLOCK_M, len(k)] in x's dtype, zero past K; through perm with act-order."""
    k_mask = k < K
    cols = tl.load(perm_ptr + k, mask=k_mask, other=0) if HAS_PERM else k
    return tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + cols[None, :],
                   mask=m_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _group_rows(s_ptr, z_ptr, g, offs_n, n_mask, stride_sg):
    """Group g's (16 s, (16 + z) s) as float32 [BLOCK_N] rows: w = v * (16 s) - (16 + z) s."""
    s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * stride_sg + offs_n, mask=n_mask, other=0).to(tl.float32)
    return 16.0 * s, (16.0 + z) * s


@triton.jit
def _group_tile(s_ptr, z_ptr, k, K, group_size, offs_n, n_mask, stride_sg):
    """Per-row (16 s, (16 + z) s) [len(k), BLOCK_N] for group sizes that cut slabs (GROUP_MODE 2)."""
    kn = (tl.minimum(k, K - 1) // group_size)[:, None] * stride_sg + offs_n[None, :]
    s = tl.load(s_ptr + kn, mask=n_mask[None, :], other=0.0).to(tl.float32)
    z = tl.load(z_ptr + kn, mask=n_mask[None, :], other=0).to(tl.float32)
    return 16.0 * s, (16.0 + z) * s


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,  # [M, K] activations, unit stride along K
    qw_ptr,  # [ceil(K / ROWS) * ROWS / 8, N] int32, the blocked layout, unit stride along N
    s_ptr,  # [G, N] scales
    z_ptr,  # [G, N] uint8 zero points, same strides as scales
    perm_ptr,  # [K] int32 (read when HAS_PERM)
    out_ptr,  # [M, N] in x's dtype, or [split_k, M, N] float32 partials (SPLIT and not ATOMIC)
    ws_ptr, cnt_ptr,  # split-K workspace (kernels/splitk.py)
    M, N, K, group_size, blocks_per_split, split_k,
    stride_xm, stride_qk, stride_sg, stride_om, stride_os,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_MODE: tl.constexpr,
    HAS_PERM: tl.constexpr, SPLIT: tl.constexpr, ATOMIC: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Few rows (BLOCK_M >= M, one M tile): multiply-adds into [BLOCK_M, ROWS / 8, BLOCK_N] float32
    registers, summed over rows once at the end. GROUP_MODE 0: a whole block lies in one group, so its scale
    and zero point apply once per block to the block's sums, 16 s sum(v x) - (16 + z) s sum(x): per weight a
    shift, an and-or and one multiply-add. 1: each slab lies in one group (a multiply-add to dequantize
    per weight); 2: any group size (per-row scale loads). PREFETCH: the next block's words are loaded
    before this block is computed (two blocks in flight per program)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_p = tl.arange(0, ROWS // 8)
    acc3 = tl.zeros((BLOCK_M, ROWS // 8, BLOCK_N), dtype=tl.float32)
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(tl.cdiv(K, ROWS), b_start + blocks_per_split)
    w_ptrs = qw_ptr + (b_start * (ROWS // 8) + offs_p)[:, None].to(tl.int64) * stride_qk + offs_n[None, :]
    if PREFETCH:
        nxt = tl.load(w_ptrs, mask=n_mask[None, :] & (b_start < b_end), other=0)
    for b in range(b_start, b_end):
        if PREFETCH:
            words = nxt
            nxt = tl.load(w_ptrs + (ROWS // 8) * stride_qk, mask=n_mask[None, :] & (b + 1 < b_end), other=0)
        else:
            words = tl.load(w_ptrs, mask=n_mask[None, :], other=0)
        w_ptrs += (ROWS // 8) * stride_qk
        if GROUP_MODE == 0:
            part = tl.zeros((BLOCK_M, ROWS // 8, BLOCK_N), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_M, ROWS // 8), dtype=tl.float32)
        for j in tl.static_range(8):
            k = b * ROWS + j * (ROWS // 8) + offs_p
            xj = _x_slab(x_ptr, perm_ptr, offs_m, m_mask, stride_xm, k, K, HAS_PERM).to(tl.float32)
            v = _nibble_unit(words, j)
            if GROUP_MODE == 0:
                part += v[None, :, :] * xj[:, :, None]
                xsum += xj
            else:
                if GROUP_MODE == 1:
                    g = tl.minimum(b * ROWS + j * (ROWS // 8), K - 1) // group_size  # slabs past K: the last group
                    s16, zs = _group_rows(s_ptr, z_ptr, g, offs_n, n_mask, stride_sg)
                    w = v * s16[None, :] - zs[None, :]
                else:
                    s16, zs = _group_tile(s_ptr, z_ptr, k, K, group_size, offs_n, n_mask, stride_sg)
                    w = v * s16 - zs
                acc3 += w[None, :, :] * xj[:, :, None]
        if GROUP_MODE == 0:
            s16, zs = _group_rows(s_ptr, z_ptr, (b * ROWS) // group_size, offs_n, n_mask, stride_sg)
            acc3 += part * s16[None, None, :] - xsum[:, :, None] * zs[None, None, :]
    acc = tl.sum(acc3, axis=1)
    splitk_store(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_os, ws_ptr, cnt_ptr, pid_n, split_k, SPLIT, ATOMIC)


@triton.jit
def _w4a16_mma_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, ws_ptr, cnt_ptr,  # as in _w4a16_gemv_kernel
    M, N, K, group_size, blocks_per_split, split_k,
    stride_xm, stride_qk, stride_sg, stride_om, stride_os,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_MODE: tl.constexpr,
    HAS_PERM: tl.constexpr, SPLIT: tl.constexpr, ATOMIC: tl.constexpr, SLABS: tl.constexpr, IEEE: tl.constexpr,
):
    """Tensor cores. SLABS (ROWS = 128): eight [BLOCK_M, 16] x [16, BLOCK_N] dots per block, one per nibble;
    else the nibbles are stacked into one [ROWS, BLOCK_N] tile (rows in natural order) and one dot.
    GROUP_MODE as in the GEMV kernel (1 needs SLABS; without it 2 is used). Dequantizing is one
    multiply-add per weight, v (16 s) - (16 + z) s, then the cast to x's dtype."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    offs_p = tl.arange(0, ROWS // 8)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(tl.cdiv(K, ROWS), b_start + blocks_per_split)
    for b in range(b_start, b_end):
        words = tl.load(qw_ptr + (b * (ROWS // 8) + offs_p)[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                        mask=n_mask[None, :], other=0)
        if GROUP_MODE == 0:
            s16, zs = _group_rows(s_ptr, z_ptr, (b * ROWS) // group_size, offs_n, n_mask, stride_sg)
        if SLABS:
            for j in tl.static_range(8):
                k = b * ROWS + j * (ROWS // 8) + offs_p
                a = _x_slab(x_ptr, perm_ptr, offs_m, m_mask, stride_xm, k, K, HAS_PERM)
                v = _nibble_unit(words, j)
                if GROUP_MODE == 0:
                    w = v * s16[None, :] - zs[None, :]
                elif GROUP_MODE == 1:
                    g = tl.minimum(b * ROWS + j * (ROWS // 8), K - 1) // group_size
                    s16, zs = _group_rows(s_ptr, z_ptr, g, offs_n, n_mask, stride_sg)
                    w = v * s16[None, :] - zs[None, :]
                else:
                    s16t, zst = _group_tile(s_ptr, z_ptr, k, K, group_size, offs_n, n_mask, stride_sg)
                    w = v * s16t - zst
                if IEEE:
                    acc = tl.dot(a, w.to(dt), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, w.to(dt), acc)
        else:
            k = b * ROWS + tl.arange(0, ROWS)
            a = _x_slab(x_ptr, perm_ptr, offs_m, m_mask, stride_xm, k, K, HAS_PERM)
            t = (words[None, :, :] >> (tl.arange(0, 8) * 4)[:, None, None]) << 19  # nibble j to bits 19..22
            v = tl.reshape(((t & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True), (ROWS, BLOCK_N))
            if GROUP_MODE == 0:
                w = v * s16[None, :] - zs[None, :]
            else:
                s16t, zst = _group_tile(s_ptr, z_ptr, k, K, group_size, offs_n, n_mask, stride_sg)
                w = v * s16t - zst
            if IEEE:
                acc = tl.dot(a, w.to(dt), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w.to(dt), acc)
    splitk_store(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_os, ws_ptr, cnt_ptr, pid, split_k, SPLIT, ATOMIC)


@triton.jit
def _w4a16_gemv1_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, ws_ptr, cnt_ptr,  # as in _w4a16_gemv_kernel; x is [1, K]
    N, K, group_size, blocks_per_split, split_k, stride_qk, stride_sg, stride_os,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_PERM: tl.constexpr,
    SPLIT: tl.constexpr, ATOMIC: tl.constexpr, PREFETCH: tl.constexpr,
):
    """M = 1 (batch-1 decode) in two dimensions only: each slab [ROWS / 8, BLOCK_N] times x's slab as a
    column, into one [ROWS / 8, BLOCK_N] float32 accumulator summed over rows at the end. The same
    arithmetic as _w4a16_gemv_kernel without its M dimension (whose 3-D broadcasts can cost layout
    conversions)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_p = tl.arange(0, ROWS // 8)
    acc = tl.zeros((ROWS // 8, BLOCK_N), dtype=tl.float32)
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(tl.cdiv(K, ROWS), b_start + blocks_per_split)
    w_ptrs = qw_ptr + (b_start * (ROWS // 8) + offs_p)[:, None].to(tl.int64) * stride_qk + offs_n[None, :]
    if PREFETCH:
        nxt = tl.load(w_ptrs, mask=n_mask[None, :] & (b_start < b_end), other=0)
    for b in range(b_start, b_end):
        if PREFETCH:
            words = nxt
            nxt = tl.load(w_ptrs + (ROWS // 8) * stride_qk, mask=n_mask[None, :] & (b + 1 < b_end), other=0)
        else:
            words = tl.load(w_ptrs, mask=n_mask[None, :], other=0)
        w_ptrs += (ROWS // 8) * stride_qk
        if GROUP_MODE == 0:
            part = tl.zeros((ROWS // 8, BLOCK_N), dtype=tl.float32)
            xsum = tl.zeros((ROWS // 8,), dtype=tl.float32)
        for j in tl.static_range(8):
            k = b * ROWS + j * (ROWS // 8) + offs_p
            k_mask = k < K
            cols = tl.load(perm_ptr + k, mask=k_mask, other=0) if HAS_PERM else k
            xj = tl.load(x_ptr + cols, mask=k_mask, other=0.0).to(tl.float32)
            v = _nibble_unit(words, j)
            if GROUP_MODE == 0:
                part += v * xj[:, None]
                xsum += xj
            elif GROUP_MODE == 1:
                g = tl.minimum(b * ROWS + j * (ROWS // 8), K - 1) // group_size
                s16, zs = _group_rows(s_ptr, z_ptr, g, offs_n, n_mask, stride_sg)
                acc += (v * s16[None, :] - zs[None, :]) * xj[:, None]
            else:
                s16t, zst = _group_tile(s_ptr, z_ptr, k, K, group_size, offs_n, n_mask, stride_sg)
                acc += (v * s16t - zst) * xj[:, None]
        if GROUP_MODE == 0:
            s16, zs = _group_rows(s_ptr, z_ptr, (b * ROWS) // group_size, offs_n, n_mask, stride_sg)
            acc += part * s16[None, :] - xsum[:, None] * zs[None, :]
    y = tl.sum(acc, axis=0)
    splitk_store(y[None, :], tl.arange(0, 1), offs_n, 1, N, out_ptr, 0, stride_os, ws_ptr, cnt_ptr, pid_n, split_k,
                 SPLIT, ATOMIC)


@triton.jit
def _magic_nibble(words, hi, j: tl.constexpr, exp0):
    """Nibble j (q, 0..15) of each word as the float32 q exactly, in one and-or (a LOP3) and one float
    subtraction: the nibble, left in place at bits 4i..4i+3, becomes the low mantissa bits of 2^(23 - 4i),
    whose ulp there is 1, so the float is 2^(23 - 4i) + q; taking 2^(23 - 4i) away leaves q. Nibbles 0..4
    are read in place (i = j); 5..7 from `hi` = words >> 20 (i = j - 5, one shift per word for all three).
    exp0 is 2^23's bits, 150 << 23, passed at run time: as a register it lets the and-or be one LOP3 (with
    the mask and the exponent both immediates it takes two). Beside `_nibble_unit`'s shift + and-or per
    weight this moves an integer op (half rate on Hopper) per weight to the float32 pipe."""
    i: tl.constexpr = j if j < 5 else j - 5
    src = words if j < 5 else hi
    t = (src & (0xF << (4 * i))) | (exp0 - ((4 * i) << 23))
    return t.to(tl.float32, bitcast=True) - float(1 << (23 - 4 * i))


@triton.jit
def _w4a16_gemv2_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, ws_ptr, cnt_ptr,  # as in _w4a16_gemv_kernel; x is [1, K]
    N, K, group_size, blocks_per_split, split_k, stride_qk, stride_qn, stride_sg, stride_os, exp0,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, PER_BLOCK: tl.constexpr,
    HAS_PERM: tl.constexpr, SPLIT: tl.constexpr, ATOMIC: tl.constexpr, PDL: tl.constexpr, EVEN: tl.constexpr,
):
    """M = 1, streaming: each iteration takes UNROLL packed blocks as one [UNROLL * ROWS / 8, BLOCK_N] tile of
    words, and the next tile is in flight while this one is computed. The words may be stored N-major
    (stride_qn 1: row segments of BLOCK_N * 4 bytes) or K-major (stride_qk 1: each column's words of the tile
    contiguous, and a thread's consecutive words multiply consecutive x). Nibbles by `_magic_nibble`.
    EVEN (K a multiple of ROWS, every tile's blocks inside its split): no masks along K.
    PER_BLOCK (each block inside one group: group_size % ROWS == 0, or one group over K): a block's sums
    s sum(q x) - z s sum(x) take its scale and zero point once (loaded in the tile's shape, so that they need
    no layout conversion); otherwise per-row scales (any group size).
    PDL 1: launched as a programmatic dependent launch, the first weight tile is read before waiting for
    the previous kernel (whose output may be x); 2: also lets the next kernel launch at once. Nothing but
    weights is touched before the wait."""
    S: tl.constexpr = ROWS // 8
    T: tl.constexpr = UNROLL * S
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, T)  # tile row r: block r // S, word r % S of it
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(tl.cdiv(K, ROWS), b_start + blocks_per_split)
    k_end = tl.minimum(K, b_end * ROWS)
    w_ptrs = qw_ptr + (b_start * S + offs_r)[:, None].to(tl.int64) * stride_qk + offs_n[None, :] * stride_qn
    if EVEN:
        nxt = tl.load(w_ptrs, mask=(b_start < b_end) & n_mask[None, :], other=0)
    else:
        nxt = tl.load(w_ptrs, mask=((b_start * S + offs_r) < b_end * S)[:, None] & n_mask[None, :], other=0)
    if PDL >= 2:
        gdc_launch_dependents()
    if PDL >= 1:
        gdc_wait()
    acc = tl.zeros((T, BLOCK_N), dtype=tl.float32)
    for b in range(b_start, b_end, UNROLL):
        words = nxt
        w_ptrs += T * stride_qk
        if EVEN:
            nxt = tl.load(w_ptrs, mask=(b + UNROLL < b_end) & n_mask[None, :], other=0)
        else:
            nxt = tl.load(w_ptrs, mask=(((b + UNROLL) * S + offs_r) < b_end * S)[:, None] & n_mask[None, :], other=0)
        hi = words >> 20
        kb = (b + offs_r // S) * ROWS + offs_r % S  # the row nibble 0 of each tile row holds
        if PER_BLOCK:
            part = tl.zeros((T, BLOCK_N), dtype=tl.float32)
            xsum = tl.zeros((T,), dtype=tl.float32)
        for j in tl.static_range(8):
            k = kb + j * S
            if EVEN:
                cols = tl.load(perm_ptr + k) if HAS_PERM else k
                xj = tl.load(x_ptr + cols).to(tl.float32)
            else:
                k_mask = k < k_end
                cols = tl.load(perm_ptr + k, mask=k_mask, other=0) if HAS_PERM else k
                xj = tl.load(x_ptr + cols, mask=k_mask, other=0.0).to(tl.float32)
            v = _magic_nibble(words, hi, j, exp0)
            if PER_BLOCK:
                part += v * xj[:, None]
                xsum += xj
            else:
                kn = (tl.minimum(k, K - 1) // group_size)[:, None] * stride_sg + offs_n[None, :]
                s = tl.load(s_ptr + kn, mask=n_mask[None, :], other=0.0).to(tl.float32)
                z = tl.load(z_ptr + kn, mask=n_mask[None, :], other=0).to(tl.float32)
                acc += (v * s - z * s) * xj[:, None]
        if PER_BLOCK:
            g = tl.minimum((b + offs_r // S) * ROWS, K - 1) // group_size
            kn = g[:, None] * stride_sg + offs_n[None, :]
            s = tl.load(s_ptr + kn, mask=n_mask[None, :], other=0.0).to(tl.float32)
            z = tl.load(z_ptr + kn, mask=n_mask[None, :], other=0).to(tl.float32)
            acc += part * s - xsum[:, None] * (z * s)
    y = tl.sum(acc, axis=0)
    splitk_store(y[None, :], tl.arange(0, 1), offs_n, 1, N, out_ptr, 0, stride_os, ws_ptr, cnt_ptr, pid_n, split_k,
                 SPLIT, ATOMIC)


@triton.jit
def _w4a16_gemv3_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, ws_ptr, cnt_ptr,  # as in _w4a16_gemv_kernel; x is [1, K]
    N, K, group_size, blocks_per_split, split_k, stride_qk, stride_sg, stride_os, exp0, hi_shift, inter,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, JG: tl.constexpr, HAS_PERM: tl.constexpr,
    SPLIT: tl.constexpr, ATOMIC: tl.constexpr, PDL: tl.constexpr, EVEN: tl.constexpr, XPAIR: tl.constexpr,
    FOLD: tl.constexpr, GATED: tl.constexpr, H2: tl.constexpr, ASM: tl.constexpr,
):
    """M = 1 with each thread's rows in its own registers: a tile is T consecutive words of a block (T <= ROWS / 8)
    by BLOCK_N columns, and with BLOCK_N >= 128 * num_warps Triton puts all lanes and warps along N (16-byte
    loads, 4 columns per thread and register repeats beyond), so a thread holds every row of its columns.
    Then nibble j's x values are T consecutive inputs, one vector load shared by all the thread's columns,
    and the sums over rows are additions in registers: scale and zero point apply per column once per group.
    The zero point goes into the nibble decode itself: the float subtraction takes away 2^(23 - 4i) + z
    (exact) instead of 2^(23 - 4i), so each product is (q - z) x and no sum of x is kept.
    JG: nibbles per group inside a block (8 when a block lies in one group; 1, 2, 4 for group sizes 16, 32,
    64). exp0 = 150 << 23 and hi_shift = 20 come at run time so the compiler keeps them in registers (as
    constants it splits each and-or in two, or turns the high nibbles into bitfield extracts). XPAIR (bf16 x,
    no act-order, EVEN): the tile's even and odd words are two [T / 2, BLOCK_N] tiles and x is read as int32
    pairs, so a pair becomes two floats by one shift and one and (bf16 is float32's top half) where the
    compiler's conversion spends three instructions. The next tile is in flight while this one is computed
    (the prefetch past a split's end is masked, its values unused); PDL and EVEN as in _w4a16_gemv2_kernel
    (EVEN: K % ROWS == 0). The per-tile arithmetic is kernels/w4a16_stream.py's `tile_sums` (FOLD there);
    GATED as in its gemv4: a column tile holds the same columns of the gate and up halves and the split that
    completes it writes silu(gate) * up (through the workspace even unsplit)."""
    S: tl.constexpr = ROWS // 8
    H: tl.constexpr = S // T  # tiles per block
    R: tl.constexpr = T // 2 if XPAIR else T  # rows per word tile
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n, n_mask = strip_cols(pid_n, tl.arange(0, BLOCK_N), N, inter, BLOCK_N, GATED)
    offs_r = tl.arange(0, R)
    t_start = pid_k * blocks_per_split * H
    t_end = tl.minimum(tl.cdiv(K, ROWS), (pid_k + 1) * blocks_per_split) * H
    if XPAIR:
        w_ptrs = qw_ptr + (t_start * T + 2 * offs_r)[:, None].to(tl.int64) * stride_qk + offs_n[None, :]
        nxt_o = tl.load(w_ptrs + stride_qk, mask=(t_start < t_end) & n_mask[None, :])
        x2_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    else:
        w_ptrs = qw_ptr + (t_start * T + offs_r)[:, None].to(tl.int64) * stride_qk + offs_n[None, :]
    nxt = tl.load(w_ptrs, mask=(t_start < t_end) & n_mask[None, :])
    if PDL >= 2:
        gdc_launch_dependents()
    if PDL >= 1:
        gdc_wait()
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(t_start, t_end):
        words = nxt
        if XPAIR:
            words_o = nxt_o
        w_ptrs += T * stride_qk
        nxt = tl.load(w_ptrs, mask=(i + 1 < t_end) & n_mask[None, :])
        if XPAIR:
            nxt_o = tl.load(w_ptrs + stride_qk, mask=(i + 1 < t_end) & n_mask[None, :])
        k0 = (i // H) * ROWS + (i % H) * T  # input of nibble 0 of the tile's first word
        if H2:  # packed-half arithmetic (kernels/w4a16_half2.py)
            acc = tile_sums_h2(acc, words, words_o if XPAIR else words, k0, x_ptr, x2_ptr if XPAIR else x_ptr,
                               perm_ptr, s_ptr, z_ptr, K, group_size, offs_n, n_mask, offs_r, stride_sg, S, XPAIR, EVEN,
                               HAS_PERM, ASM)
        else:
            acc = tile_sums(acc, words, words_o if XPAIR else words, k0, x_ptr, x2_ptr if XPAIR else x_ptr, perm_ptr,
                            s_ptr, z_ptr, K, group_size, offs_n, n_mask, offs_r, stride_sg, exp0, hi_shift, S, JG,
                            XPAIR, EVEN, HAS_PERM, FOLD)
    if GATED:  # the split that completes the strip writes silu(gate) * up (kernels/w4a16_stream.py)
        strip_done(acc, pid_n * BLOCK_N + tl.arange(0, BLOCK_N), n_mask, pid_n, 1, split_k, inter, out_ptr, ws_ptr,
                   cnt_ptr, BLOCK_N, GATED)
    else:
        splitk_store(acc[None, :], tl.arange(0, 1), offs_n, 1, N, out_ptr, 0, stride_os, ws_ptr, cnt_ptr, pid_n,
                     split_k, SPLIT, ATOMIC)


@triton.jit
def _w4a16_dequant_kernel(
    qw_ptr, s_ptr, z_ptr, perm_ptr,  # as in _w4a16_gemv_kernel
    w_ptr,  # [K, N] out, x's dtype: row perm[k] (act-order) or k holds input feature's weights
    N, K, group_size, stride_qk, stride_sg, stride_wk,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PERM: tl.constexpr,
):
    """One packed block -> its ROWS dequantized rows of the [K, N] matrix (for large M: cuBLAS multiplies
    x by it; the 4-bit read and 16-bit write cost once per layer, not per row of x)."""
    pid_n, b = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_p = tl.arange(0, ROWS // 8)
    words = tl.load(qw_ptr + (b * (ROWS // 8) + offs_p)[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                    mask=n_mask[None, :], other=0)
    for j in tl.static_range(8):
        k = b * ROWS + j * (ROWS // 8) + offs_p
        k_mask = k < K
        s16t, zst = _group_tile(s_ptr, z_ptr, k, K, group_size, offs_n, n_mask, stride_sg)
        w = _nibble_unit(words, j) * s16t - zst
        rows = tl.load(perm_ptr + k, mask=k_mask, other=0) if HAS_PERM else k
        tl.store(w_ptr + rows[:, None].to(tl.int64) * stride_wk + offs_n[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=k_mask[:, None] & n_mask[None, :])


GEMV_MAX_M = 16
"""The GEMV kernel keeps [BLOCK_M, ROWS / 8, BLOCK_N] products in registers: for a few rows only."""

SPLIT_MAX_M = 64
"""Split-K is for decode-sized M; the workspace holds SPLIT_MAX_M x N sums (reserved at load)."""

TUNED: dict[tuple[int, int, int], dict] = {
    # Llama-3-8B's qkv, o, gate_up, down on an H200: bench/w4a16.py's M = 1 winners (2026-11-29, helper w4mma's
    # rounds 1-2: H2 everywhere, 0.0439 ms per layer against bf16's 0.1328 and round 4's FOLD configs' 0.0518; qkv
    # and gate_up on 4 warps from round 2; the engine ran these: 2.314 ms/token) and bench/quant.py's larger-M
    # winners.
    (1, 6144, 4096): {'KERNEL': 'gemv3', 'T': 16, 'BLOCK_N': 512, 'num_warps': 4, 'num_stages': 1, 'SPLIT_K': 32,
                      'PDL': 2, 'H2': 2},
    (1, 4096, 4096): {'KERNEL': 'gemv4', 'T': 16, 'BLOCK_N': 256, 'num_warps': 2, 'num_stages': 1, 'PER_SM': 12,
                      'PDL': 2, 'H2': 2},
    (1, 28672, 4096): {'KERNEL': 'gemv3', 'T': 8, 'BLOCK_N': 512, 'num_warps': 4, 'num_stages': 1, 'SPLIT_K': 16,
                       'PDL': 2, 'H2': 2},
    (1, 4096, 14336): {'KERNEL': 'gemv3', 'T': 8, 'BLOCK_N': 256, 'num_warps': 2, 'num_stages': 1, 'SPLIT_K': 112,
                       'PDL': 2, 'H2': 2},
    (16, 4096, 4096): {'KERNEL': 'mma', 'BLOCK_M': 16, 'BLOCK_N': 64, 'SLABS': True, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 4},
    (16, 28672, 4096): {'KERNEL': 'mma', 'BLOCK_M': 16, 'BLOCK_N': 64, 'SLABS': True, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 2},
    (64, 4096, 4096): {'KERNEL': 'mma', 'BLOCK_M': 64, 'BLOCK_N': 64, 'SLABS': True, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 4},
    (64, 4096, 14336): {'KERNEL': 'mma', 'BLOCK_M': 64, 'BLOCK_N': 128, 'SLABS': False, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 16},
    (64, 28672, 4096): {'KERNEL': 'mma', 'BLOCK_M': 64, 'BLOCK_N': 128, 'SLABS': False, 'num_warps': 4, 'num_stages': 3, 'SPLIT_K': 2},
}
"""(M bucket, N, K) -> launch config measured fastest on the GPU (bench/quant.py's winner table; M buckets
1, 16, 64, 256: the smallest bucket >= M). Shapes not listed use `pick_config`'s rules."""

_DEQUANT: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_DEQUANT_RETIRED: list[torch.Tensor] = []
"""The "dequant" path's scratch [K, N] matrix, one per device and dtype (layers run one at a time); replaced
buffers stay alive for the CUDA graphs that point at them."""


def m_bucket(m: int) -> int:
    return 1 if m <= 1 else 16 if m <= 16 else 64 if m <= 64 else 256


def pick_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> dict:
    """Launch config: a measured one from TUNED, else `gemv3` at M = 1 (group sizes it takes),
    the tensor-core kernel up to M = 64 (split-K when the tiles would leave SMs idle) and dequantize-then-cuBLAS
    above."""
    hit = TUNED.get((m_bucket(m), n, k))
    if hit is not None:
        return dict(hit)
    s = block_rows(k) // 8
    if m == 1 and (group_size % (8 * s) == 0 or group_size >= k or (group_size % s == 0 and 8 * s % group_size == 0)):
        return dict(KERNEL="gemv3", T=8, BLOCK_N=128, num_warps=1, num_stages=1)  # the 8B shapes' usual winner
    if m <= 16:
        return dict(KERNEL="mma", BLOCK_M=16, BLOCK_N=64, SLABS=True, num_warps=4, num_stages=3)
    if m <= 64:
        return dict(KERNEL="mma", BLOCK_M=64, BLOCK_N=128, SLABS=True, num_warps=4, num_stages=3)
    return dict(KERNEL="dequant", BLOCK_N=128, num_warps=4)  # dequantize once, then cuBLAS


def _group_mode(group_size: int, k: int, rows: int, slabs: bool) -> int:
    if group_size % rows == 0 or group_size >= k:
        return 0  # one group per block (or one over all of K)
    if group_size % (rows // 8) == 0 and slabs:
        return 1
    return 2


def reserve_workspace(device: torch.device, n: int, k: int | None = None, dtype: torch.dtype | None = None) -> None:
    """At load, before CUDA graph capture: room for this layer's split-K sums (SPLIT_MAX_M x N) and, given k
    and dtype, for its dequantized [K, N] matrix."""
    splitk.reserve(device, SPLIT_MAX_M * n)
    if k is not None:
        _dequant_buffer(torch.device(device), dtype, k * n)


def _dequant_buffer(device: torch.device, dtype: torch.dtype, elements: int) -> torch.Tensor:
    have = _DEQUANT.get((device, dtype))
    if have is not None and have.numel() >= elements:
        return have
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"W4A16 dequant buffer on {device} holds {0 if have is None else have.numel()} values, "
                           f"needs {elements}: reserve it at load, before CUDA graph capture")
    if have is not None:
        _DEQUANT_RETIRED.append(have)
    _DEQUANT[(device, dtype)] = torch.empty(elements, dtype=dtype, device=device)
    return _DEQUANT[(device, dtype)]


def _dequant_matmul(x, qweight, scales, zeros, group_size, perm, rows, cfg, warmup):
    """x @ W with W [K, N] dequantized into the scratch buffer first (rows un-permuted for act-order)."""
    k, n = x.shape[1], qweight.shape[1]
    w = _dequant_buffer(x.device, x.dtype, k * n)[:k * n].view(k, n)
    bn = cfg.get("BLOCK_N", 128)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, rows))
    args = (qweight, scales, zeros, perm if perm is not None else qweight, w, n, k, group_size, qweight.stride(0),
            scales.stride(0), w.stride(0))
    consts = dict(ROWS=rows, BLOCK_N=bn, HAS_PERM=perm is not None, num_warps=cfg.get("num_warps", 4))
    if warmup:
        _w4a16_dequant_kernel.warmup(*args, grid=grid, **consts)
        return None
    _w4a16_dequant_kernel[grid](*args, **consts)
    return x @ w


def w4a16(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
          perm: torch.Tensor | None = None, config: dict | None = None, warmup: bool = False,
          gated: bool = False) -> torch.Tensor | None:
    """x [M, K] (fp16/bf16/fp32) -> [M, N] in x's dtype. `config` overrides `pick_config` (tests, sweeps):
    KERNEL "gemv1" | "gemv2" | "gemv3" | "gemv4" (M = 1; gemv4's keys: kernels/w4a16_stream.py) | "gemv"
    (M <= BLOCK_M <= 16) | "mma" | "dequant" (dequantize, then cuBLAS), BLOCK_M, BLOCK_N, SLABS (mma),
    UNROLL (gemv2), T (gemv3), SPLIT_K (default: about two programs per SM), ATOMIC (default True: one-launch
    split-K), PREFETCH (gemv, gemv1; default True), GROUP_MODE (1 or 2 where the group size allows 0 or 1:
    scales per slab or per row), PDL (gemv2, gemv3, gemv4: 0, 1 or 2; default 2 where kernels/pdl.py is on,
    else 0), num_warps, num_stages, maxnreg. `warmup`: compile for these arguments and return None without
    running (bench/quant.py compiles its sweep in parallel that way). `gated` (a SwiGLU MLP's gate/up
    projection, N = 2 * inter, gate columns first): -> silu(gate) * up [M, inter], in gemv3's (one-launch
    split-K) or gemv4's epilogue, else by kernels/silu_mul.py after the product."""
    if gated:
        if qweight.shape[1] % 2:
            raise ValueError(f"gated: N must be even (gate then up columns), got {qweight.shape[1]}")
        cfg = config or pick_config(x.shape[0] if x.dim() == 2 else -1, qweight.shape[1], x.shape[-1], group_size,
                                    x.device)
        fused = cfg.get("KERNEL") == "gemv4" or (cfg.get("KERNEL") == "gemv3" and cfg.get("ATOMIC", True))
        if not fused or x.dim() != 2 or x.shape[0] != 1:
            y = w4a16(x, qweight, scales, zeros, group_size, perm, cfg, warmup)
            if warmup:
                return None
            from kernels.silu_mul import silu_mul

            return silu_mul(y)
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    m, k = x.shape
    n = qweight.shape[1]
    g = scales.shape[0]
    rows = block_rows(k)
    blocks = -(-k // rows)
    if qweight.dtype != torch.int32 or qweight.shape[0] != blocks * rows // 8:
        raise ValueError(f"qweight must be int32 [ceil(K/{rows}) * {rows // 8}, N] = [{blocks * rows // 8}, N] "
                         f"(pack_int4), got {qweight.dtype} {tuple(qweight.shape)}")
    if tuple(zeros.shape) != (g, n) or scales.shape[1] != n or g != -(-k // group_size):
        raise ValueError(f"scales and zeros must be [ceil(K/group_size), N] = [{-(-k // group_size)}, {n}], got "
                         f"{tuple(scales.shape)} and {tuple(zeros.shape)}")
    if perm is not None and (perm.shape != (k,) or perm.dtype != torch.int32):
        raise ValueError(f"perm must be int32 [K] = [{k}], got {perm.dtype} {tuple(perm.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = dict(config or pick_config(m, n, k, group_size, x.device))
    kind = cfg.pop("KERNEL")
    k_major = qweight.stride(0) == 1 and qweight.shape[0] > 1 and kind == "gemv2"  # gemv2 reads either order
    if (qweight.stride(1) != 1 and not k_major) or scales.stride(1) != 1 or zeros.stride() != scales.stride():
        qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    if kind == "dequant":
        return _dequant_matmul(x, qweight, scales, zeros, group_size, perm, rows, cfg, warmup)
    if kind == "gemv" and (m > cfg["BLOCK_M"] or m > GEMV_MAX_M):
        raise ValueError(f"the GEMV kernel takes M <= BLOCK_M <= {GEMV_MAX_M}, got M = {m}, BLOCK_M = {cfg['BLOCK_M']}")
    if kind in ("gemv1", "gemv2", "gemv3", "gemv4") and m != 1:
        raise ValueError(f"the {kind} kernel takes M = 1, got M = {m}")
    if kind == "gemv4":
        pdl = cfg.pop("PDL", 2 if pdl_launch.on(x) else 0) if x.is_cuda else 0  # the interpreter has no PDL
        return w4a16_stream.launch(x, qweight, scales, zeros, group_size, perm, rows, cfg, pdl, warmup, gated)
    tiles = triton.cdiv(n, cfg["BLOCK_N"]) * (1 if kind.startswith("gemv") else triton.cdiv(m, cfg["BLOCK_M"]))
    split = cfg.pop("SPLIT_K", None)
    if split is None and kind == "gemv3":  # one-warp programs: about 8 per SM (the 8B winners: split-K 16-112)
        split = splitk.split_for(tiles, blocks, splitk.sm_count(x.device), 8, max_split=128, min_blocks=1)
    elif split is None:
        per_sm = 4 if kind.startswith("gemv") else 2  # the GEMV hides memory latency with more programs
        split = splitk.split_for(tiles, blocks, splitk.sm_count(x.device), per_sm) if m <= SPLIT_MAX_M else 1
    unroll = cfg.pop("UNROLL", 1) if kind == "gemv2" else 1
    per_split = triton.cdiv(triton.cdiv(blocks, split), unroll) * unroll  # whole tiles of UNROLL blocks
    split = triton.cdiv(blocks, per_split)
    atomic = cfg.pop("ATOMIC", True)
    out, ws, cnt = splitk.outputs(x, m, n, split, atomic)
    if gated:  # gemv3: strips of BLOCK_N / 2 gate and as many up columns, summed through the workspace
        tiles = triton.cdiv(n // 2, cfg["BLOCK_N"] // 2)
        out = torch.empty((1, n // 2), dtype=x.dtype, device=x.device)
        ws, cnt = splitk.workspace(x.device, tiles * cfg["BLOCK_N"])
    if m == 0:
        return splitk.finish(out, x.dtype)
    slabs = cfg.pop("SLABS", True) and rows == 128
    mode = _group_mode(group_size, k, rows, slabs or kind != "mma")
    forced = cfg.pop("GROUP_MODE", None)  # a sweep may try a more general mode, never a wrong one
    if forced is not None and forced > mode and (forced == 2 or _group_mode(group_size, k, rows, True) < 2):
        mode = forced
    pointers = (x, qweight, scales, zeros, perm if perm is not None else qweight, out, ws, cnt)
    stride_os = out.stride(0) if out.dim() == 3 else 0
    prefetch = cfg.pop("PREFETCH", True)
    pdl = cfg.pop("PDL", 2 if pdl_launch.on(x) else 0) if x.is_cuda else 0  # the interpreter has no PDL
    consts = dict(cfg, ROWS=rows, GROUP_MODE=mode, HAS_PERM=perm is not None, SPLIT=split > 1, ATOMIC=atomic)
    if kind == "gemv2":
        consts.pop("GROUP_MODE")
        consts.update(UNROLL=unroll, PER_BLOCK=mode == 0, PDL=pdl, EVEN=k % rows == 0 and blocks % unroll == 0)
        if pdl:
            consts["launch_pdl"] = True
    if kind == "gemv3":
        t = min(cfg.pop("T", 8), rows // 8)
        jg = w4a16_stream.group_words(group_size, k, rows, mode == 0, "gemv3")
        xpair = (cfg.pop("XPAIR", True) and x.dtype == torch.bfloat16 and perm is None and k % rows == 0
                 and x.data_ptr() % 4 == 0)  # int32 loads of x need 4-byte alignment
        h2, xpair = w4a16_stream.half2_mode(cfg.pop("H2", 0), jg, x.dtype, xpair)
        consts = dict(cfg, ROWS=rows, T=t, JG=jg, HAS_PERM=perm is not None, SPLIT=split > 1, ATOMIC=atomic, PDL=pdl,
                      EVEN=k % rows == 0, XPAIR=xpair, FOLD=bool(cfg.pop("FOLD", False)), GATED=gated, H2=h2,
                      ASM=x.is_cuda)
        if pdl:
            consts["launch_pdl"] = True
        args = pointers + (n, k, group_size, per_split, split, qweight.stride(0), scales.stride(0), stride_os, 150 << 23,
                           20, n // 2 if gated else n)
    elif kind == "gemv2":
        args = pointers + (n, k, group_size, per_split, split, qweight.stride(0), qweight.stride(1), scales.stride(0),
                           stride_os, 150 << 23)
    elif kind == "gemv1":
        consts.pop("BLOCK_M", None)
        args = pointers + (n, k, group_size, per_split, split, qweight.stride(0), scales.stride(0), stride_os)
    else:
        args = pointers + (m, n, k, group_size, per_split, split, x.stride(0), qweight.stride(0), scales.stride(0),
                           out.stride(-2), stride_os)
    if kind == "mma":
        consts.update(SLABS=slabs, IEEE=x.dtype == torch.float32)
    elif kind not in ("gemv2", "gemv3"):
        consts.update(PREFETCH=prefetch)
    kernel = {"gemv": _w4a16_gemv_kernel, "gemv1": _w4a16_gemv1_kernel, "gemv2": _w4a16_gemv2_kernel,
              "gemv3": _w4a16_gemv3_kernel, "mma": _w4a16_mma_kernel}[kind]
    if warmup:
        kernel.warmup(*args, grid=(tiles, split), **consts)
        return None
    kernel[(tiles, split)](*args, **consts)
    return splitk.finish(out, x.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[K, N] values 0..15 (rows in the order the kernel reads them) -> [ceil(K/R) * R/8, N] int32 in the
    kernel's layout, R = block_rows(K): nibble j of word (R/8) b + p holds row R b + (R/8) j + p (zero rows
    pad K)."""
    k, n = q.shape
    rows = block_rows(k)
    blocks, s = -(-k // rows), rows // 8
    q = torch.nn.functional.pad(q.to(torch.int32), (0, 0, 0, blocks * rows - k)).reshape(blocks, 8, s, n)
    out = torch.zeros(blocks, s, n, dtype=torch.int32, device=q.device)
    for j in range(8):
        out |= q[:, j] << (4 * j)
    return out.reshape(blocks * s, n)


def unpack_int4(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """pack_int4's inverse: -> [K, N] int32 values 0..15."""
    n = qweight.shape[1]
    words = qweight.reshape(-1, 1, block_rows(k) // 8, n)
    shifts = (torch.arange(8, device=qweight.device, dtype=torch.int32) * 4).reshape(1, 8, 1, 1)
    return ((words >> shifts) & 0xF).reshape(-1, n)[:k]


def dequantize_int4(qweight, scales, zeros, group_size: int, k: int) -> torch.Tensor:
    """The float32 [K, N] matrix the kernel multiplies by (rows in sorted order when act-order)."""
    g = torch.arange(k, device=qweight.device) // group_size
    return (unpack_int4(qweight, k) - zeros[g].to(torch.int32)).float() * scales[g].float()


def w4a16_reference(x, qweight, scales, zeros, group_size: int, perm=None) -> torch.Tensor:
    """Dequantize, then matmul in x's dtype: the CPU path and the kernel tests' reference."""
    w = dequantize_int4(qweight, scales, zeros, group_size, x.shape[-1])
    xs = x[:, perm.long()] if perm is not None else x
    return xs @ w.to(x.dtype)
