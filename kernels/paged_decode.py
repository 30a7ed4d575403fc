"""Paged decode attention: one query token per sequence over that sequence's KV blocks.

One program handles one (sequence, KV head, KV split): it loads the query rows of all
`num_heads // num_kv_heads` query heads that share the KV head (padded to 16 rows for tl.dot), so
every K/V element is read from memory once per step. Each loop iteration gathers TILE_N cached
tokens (possibly from several blocks: token t lives in block_table[t // BLOCK_SIZE]) and runs an
online softmax in base 2 with the softmax scale folded into the exponent.

Split-KV: with few (sequence, KV head) pairs and long contexts the grid would leave most SMs idle,
so the context is cut into NUM_SPLITS ranges, each program writes its unnormalized partial output
with its running max and sum (fp32), and `_reduce_splits_kernel` combines them. The split count is a
launch parameter only: the ranges are computed in the kernel from each sequence's own length, so
any split count is correct for any lengths (a CUDA graph captured with one stays correct).

An fp8 cache (float8_e4m3fn, KV_FP8) is upcast as it is loaded; k_scale rides in the softmax scale (the host
multiplies them) and v_scale multiplies the output once at the end. With a bfloat16 query both dots run in
float16 (F16_DOTS): e4m3 -> float16 is one packed conversion per two values (`cvt.rn.f16x2.e4m3x2`, exact),
where Triton's e4m3 -> bfloat16 is three (through float16). The query is scaled by a power of two into
float16's range (exact: bfloat16's 8-bit mantissa fits float16's 11) and the scores unscaled by it; P in
float16 keeps more bits than in bfloat16. The launch over an fp8 pool is its own (FP8_KV_CONFIG; PREFETCH
loads the next tile into registers while this one is attended, for launches without shared-memory staging).
"""

from __future__ import annotations

import os
from functools import partial

import torch
import triton
import triton.language as tl

from kernels import fp8_quant, pdl
from kernels.fp8_quant import quantize_row_when_last
from kernels.paged_checks import check_kv_scales, check_paged_inputs, check_query_start_loc
from kernels.paged_common import base2_scores, head_dim_pad, kernel_variants, load_tile

# Split-KV rule (choose_num_splits), from bench/chat_kernels.py round 1 (H200, 2026-11-30, 8B heads, contexts of
# 200-1800 tokens, per launch in a CUDA graph of 16 layers, the reduce included): at 4-64 sequences 8-16 splits
# beat the rule before (4 splits up to 16 sequences, 2 at 24-32, none from 33) by 5-33% (4 sequences 16.9 -> 11.3
# us, 24: 42.1 -> 34.4, 48: 70.7 -> 60.4); from 96 sequences (768 programs) one split ties or wins.
SPLIT_PROGRAMS_PER_SM = 4
"""Split only while the (sequence, KV head) programs number at most this many per SM."""
MIN_SPLITS = 8
"""Where it splits, at least this many splits (if the context allows: MIN_TOKENS_PER_SPLIT each)."""
MIN_TOKENS_PER_SPLIT = 128
# ... except when the (sequence, KV head) programs would occupy only a few SMs (FEW_PROGRAMS_PER_SM: at most one
# per 8 SMs, e.g. one or two sequences of an 8-KV-head model): a program then walks its context alone, one
# dependent tile after another, and the step waits on that. H200, bench/w4a16.py's attention section (one
# sequence, 32 q / 8 KV heads, d 128, 2026-11-29): 7.05 / 11.25 us per launch at 256 / 384 tokens in one split,
# 4.54-4.64 / 4.94 with 4-8 splits; the W4A16 engine's batch-1 decode 2.223 -> 2.126 ms/token with 128-token splits.
MIN_TOKENS_PER_SPLIT_FEW = 64
FEW_PROGRAMS_PER_SM = 1 / 8
MAX_SPLITS = 64
SPLIT_RULE_ENV = "FOLIO_DECODE_SPLIT_RULE"
"""A/B runs: "s6" the rule of session 6 (512-token splits, only under 2 programs per SM, ~4 programs per SM), "s7"
that rule with MIN_TOKENS_PER_SPLIT_FEW at one or two sequences; unset: the current rule."""


@triton.jit(do_not_specialize=["stride_bt", "window"])
def _paged_decode_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]: the one new token of each sequence
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]  (kv_cache[0])
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]  (kv_cache[1])
    block_tables_ptr,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens_ptr,  # int32 [num_seqs]: context length including the new token
    query_start_loc_ptr,  # int32 [num_seqs + 1] (read if ROWS_FROM_QSL)
    out_ptr,  # [num_seqs, num_heads, head_dim]  (written when NUM_SPLITS == 1)
    part_out_ptr,  # fp32 [num_seqs, num_heads, NUM_SPLITS, head_dim]  (NUM_SPLITS > 1)
    part_m_ptr,  # fp32 [num_seqs, num_heads, NUM_SPLITS]: running max (base-2 logits)
    part_l_ptr,  # fp32 [num_seqs, num_heads, NUM_SPLITS]: running sum of exp2
    slopes_ptr,  # fp32 [num_heads]: ALiBi slopes (read if USE_ALIBI)
    sinks_ptr,  # fp32 [num_heads]: sink logits (read if USE_SINKS)
    qk_scale,  # softmax scale * log2(e)
    softcap_in,  # scale / softcap
    softcap_out2,  # softcap * log2(e)
    window,  # sliding window: the query at seq_len - 1 sees keys seq_len - window ... (if USE_WINDOW)
    v_scale,  # an fp8 cache's value scale (read if KV_FP8)
    stride_qs,
    stride_qh,
    stride_os,
    stride_oh,
    stride_bt,
    stride_cb,
    stride_cs,
    stride_ch,
    num_heads,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_G: tl.constexpr,  # QUERIES_PER_KV padded to a power of two >= 16 (tl.dot's minimum)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # next power of two (>= 16); the extra columns are masked
    D_MASKED: tl.constexpr,  # HEAD_DIM != HEAD_DIM_PAD
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVICTION: tl.constexpr,  # "" or "evict_first"
    HEADS_FASTEST: tl.constexpr,  # grid (kv_heads, seqs, splits) rather than (seqs, kv_heads, splits)
    KV_FP8: tl.constexpr,  # the cache is float8 e4m3 (k_scale already folded into qk_scale by the host)
    F16_DOTS: tl.constexpr,  # KV_FP8 with a 16-bit q: both dots in float16, q scaled by a power of two
    CVT_BITS: tl.constexpr,  # F16_DOTS with e4m3 -> float16 by byte moves and masks (_e4m3_to_f16_bits)
    PREFETCH: tl.constexpr,  # load tile t + 1 while tile t is attended (for num_stages=1: no shared-memory staging)
    ROWS_FROM_QSL: tl.constexpr,  # q/out row of a sequence = query_start_loc[seq]; others than 1 new token skipped
    PDL: tl.constexpr = False,  # kernels/pdl.py
    FP8_OUT: tl.constexpr = False,  # also quantize each sequence's output row per token (one split; fp8_out)
    q8_ptr=None,  # float8_e4m3fn [num_seqs, num_heads * HEAD_DIM] (FP8_OUT)
    s8_ptr=None,  # fp32 [num_seqs] scales (FP8_OUT)
    count_ptr=None,  # int32 [>= num_seqs], zero: programs done per sequence (FP8_OUT)
    ub=0.0,  # the scale's amax bound (HAS_UB)
    HAS_UB: tl.constexpr = False,
    HW_CVT: tl.constexpr = False,  # kernels/fp8_quant.py's
    OUT_BLOCK: tl.constexpr = 16,  # next power of two of num_heads * HEAD_DIM (FP8_OUT)
):
    pdl.enter(PDL)
    if HEADS_FASTEST:
        # Programs launched together read the neighbouring heads' rows of the same blocks.
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if ROWS_FROM_QSL:  # a mixed step: only its one-token sequences are this kernel's
        row = tl.load(query_start_loc_ptr + seq)
        if tl.load(query_start_loc_ptr + seq + 1) - row != 1:
            return
    else:
        row = seq
    seq_len = tl.load(seq_lens_ptr + seq)
    num_tiles = tl.cdiv(seq_len, TILE_N)
    if USE_WINDOW:
        # Tiles wholly before the window are never visited, their blocks never read (they may be freed).
        key_lo = tl.maximum(seq_len - window, 0)
        first_tile = key_lo // TILE_N
    else:
        key_lo = 0
        first_tile = 0
    if NUM_SPLITS == 1:
        tile_start = first_tile
        tile_end = num_tiles
    else:
        tiles_per_split = tl.cdiv(num_tiles - first_tile, NUM_SPLITS)
        tile_start = first_tile + split * tiles_per_split
        tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, TILE_N)
    d_ok = offs_d < HEAD_DIM
    heads = kv_head * QUERIES_PER_KV + offs_g
    g_mask = offs_g < QUERIES_PER_KV
    seq64 = seq.to(tl.int64)
    row64 = row.to(tl.int64)
    q = load_tile(q_ptr + row64 * stride_qs + heads[:, None] * stride_qh + offs_d[None, :], g_mask, d_ok,
                  True, D_MASKED, "")
    if F16_DOTS:
        q, q_unscale = _q_to_f16(q)
        if CVT_BITS:
            q_unscale = q_unscale * 256.0

    if USE_SINKS:
        # The sink is a key with logit sinks[h] and no value; it belongs to split 0 alone.
        sink = tl.load(sinks_ptr + heads, mask=g_mask & (split == 0), other=float("-inf")) * 1.4426950408889634
        m_i = sink
        l_i = tl.where(sink > float("-inf"), 1.0, 0.0)
    else:
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    if USE_ALIBI:
        slopes2 = tl.load(slopes_ptr + heads, mask=g_mask, other=0.0) * 1.4426950408889634
    else:
        slopes2 = m_i  # unused
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + (seq_len - 1)
    acc = tl.zeros([BLOCK_G, HEAD_DIM_PAD], dtype=tl.float32)
    block_table = block_tables_ptr + seq64 * stride_bt
    head_off = kv_head * stride_ch
    if not F16_DOTS:
        q_unscale = 1.0
    if PREFETCH:  # the next tile's block ids and K/V are loaded before this tile is used (registers, no staging)
        pos, valid, k, v = _kv_tile(tile_start, tile_end, seq_len, key_lo, offs_n, offs_d, d_ok, block_table,
                                    head_off, k_cache_ptr, v_cache_ptr, stride_cb, stride_cs, BLOCK_SIZE, TILE_N,
                                    USE_WINDOW, D_MASKED, EVICTION, True)
        for tile in range(tile_start, tile_end):
            pos_n, valid_n, k_n, v_n = _kv_tile(tile + 1, tile_end, seq_len, key_lo, offs_n, offs_d, d_ok, block_table,
                                                head_off, k_cache_ptr, v_cache_ptr, stride_cb, stride_cs, BLOCK_SIZE,
                                                TILE_N, USE_WINDOW, D_MASKED, EVICTION, True)
            m_i, l_i, acc = _attend_tile(q, k, v, pos, valid, q_pos, slopes2, qk_scale, softcap_in, softcap_out2,
                                         q_unscale, m_i, l_i, acc, KV_FP8, F16_DOTS, CVT_BITS, USE_SOFTCAP, USE_ALIBI,
                                         DOT_PRECISION)
            pos, valid, k, v = pos_n, valid_n, k_n, v_n
    else:
        for tile in range(tile_start, tile_end):
            pos, valid, k, v = _kv_tile(tile, tile_end, seq_len, key_lo, offs_n, offs_d, d_ok, block_table, head_off,
                                        k_cache_ptr, v_cache_ptr, stride_cb, stride_cs, BLOCK_SIZE, TILE_N, USE_WINDOW,
                                        D_MASKED, EVICTION, False)
            m_i, l_i, acc = _attend_tile(q, k, v, pos, valid, q_pos, slopes2, qk_scale, softcap_in, softcap_out2,
                                         q_unscale, m_i, l_i, acc, KV_FP8, F16_DOTS, CVT_BITS, USE_SOFTCAP, USE_ALIBI,
                                         DOT_PRECISION)

    if KV_FP8:
        acc = acc * v_scale
    if CVT_BITS:
        acc = acc * 256.0  # _e4m3_to_f16_bits' values are 2^-8 of the stored ones
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + row64 * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_ok[None, :])
        if FP8_OUT:  # the sequence's last KV head to finish quantizes its whole row for the FP8 o_proj
            quantize_row_when_last(out_ptr + row64 * stride_os, q8_ptr + row64 * (num_heads * HEAD_DIM), s8_ptr + row,
                                   count_ptr + seq, num_heads * HEAD_DIM, num_heads // QUERIES_PER_KV, ub, OUT_BLOCK,
                                   HAS_UB, HW_CVT)
    else:
        part = (seq64 * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=g_mask[:, None] & d_ok[None, :])
        tl.store(part_m_ptr + part, m_i, mask=g_mask)
        tl.store(part_l_ptr + part, l_i, mask=g_mask)


@triton.jit
def _kv_tile(tile, tile_end, seq_len, key_lo, offs_n, offs_d, d_ok, block_table, head_off, k_cache_ptr, v_cache_ptr,
             stride_cb, stride_cs, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr,
             D_MASKED: tl.constexpr, EVICTION: tl.constexpr, LIMIT: tl.constexpr):
    """Tile `tile`'s key positions, their validity and K/V [TILE_N, HEAD_DIM_PAD] as stored (LIMIT: a tile at
    or past tile_end, a prefetch beyond this program's range, reads nothing)."""
    pos = tile * TILE_N + offs_n
    valid = pos < seq_len
    if USE_WINDOW:
        valid = valid & (pos >= key_lo)
    if LIMIT:
        valid = valid & (tile < tile_end)
    block = tl.load(block_table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    tok_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + head_off
    kv_off = tok_off[:, None] + offs_d[None, :]
    # K/V are streamed once: evict them first so they do not push block tables and q out of L2.
    k = load_tile(k_cache_ptr + kv_off, valid, d_ok, True, D_MASKED, EVICTION)
    v = load_tile(v_cache_ptr + kv_off, valid, d_ok, True, D_MASKED, EVICTION)
    return pos, valid, k, v


@triton.jit
def _attend_tile(q, k, v, pos, valid, q_pos, slopes2, qk_scale, softcap_in, softcap_out2, q_unscale, m_i, l_i, acc,
                 KV_FP8: tl.constexpr, F16_DOTS: tl.constexpr, CVT_BITS: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                 USE_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One tile of the online softmax: (m_i, l_i, acc) updated with keys k and values v at positions pos."""
    if CVT_BITS:
        k = _e4m3_to_f16_bits(k)
        v = _e4m3_to_f16_bits(v)
    elif KV_FP8:
        k = k.to(q.dtype)  # float16 under F16_DOTS
        v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if F16_DOTS:
        s = s * q_unscale  # (times 256 under CVT_BITS: folded into q_unscale)
    if USE_SOFTCAP or USE_ALIBI:
        s = base2_scores(s, pos, q_pos, slopes2, qk_scale, softcap_in, softcap_out2, USE_SOFTCAP, USE_ALIBI)
        scale = 1.0
    else:
        scale = qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _q_to_f16(q):
    """q (16-bit, [G, D]) times 2^(14 - E) as float16, where 2^E <= max|q| < 2^(E+1), and 2^(E - 14): the
    scaled q's largest value lies in [2^14, 2^15) (float16 holds 65504), each value converts exactly (down to
    2^-24 of the scaled range, i.e. ~2^-38 of max|q|, below which a value is rounded to float16's subnormals or
    zero). Both factors are made from exponent bits, so they are exact powers of two."""
    qf = q.to(tl.float32)
    amax = tl.max(tl.max(tl.abs(qf), 1), 0)
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # the biased exponent of max|q| (0: zero/subnormal)
    e = tl.minimum(tl.maximum(e, 15), 254)  # keep both factors' exponents in 1 ... 254
    up = ((268 - e) << 23).to(tl.float32, bitcast=True)  # 2^(127 + 14 - e + 127 - 127) = 2^(14 - (e - 127))
    down = ((e - 14) << 23).to(tl.float32, bitcast=True)  # 2^(e - 127 - 14)
    return (qf * up).to(tl.float16), down


@triton.jit
def _e4m3_to_f16_bits(x):
    """e4m3 [R, C] -> float16 holding 2^-8 of each value, exactly (subnormals too; e4m3fn's NaN bytes read as +-480):
    per four bytes two byte permutes place each byte in the top of a 16-bit lane, then a shift and two masks
    move its seven magnitude bits under float16's exponent (bias 15 against e4m3's 7: the 2^-8) beside the
    sign. Integer ops instead of the conversion unit's cvt (GPU only: the interpreter has no inline asm)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 z, a, b, t, u;
        mov.b32 z, 0;
        prmt.b32 a, $2, z, 0x1404;
        prmt.b32 b, $2, z, 0x3424;
        shr.b32 t, a, 1;
        shr.b32 u, b, 1;
        and.b32 t, t, 0x3F803F80;
        and.b32 u, u, 0x3F803F80;
        lop3.b32 $0, t, 0x80008000, a, 0xF8;
        lop3.b32 $1, u, 0x80008000, b, 0xF8;
        }""",
        constraints="=r,=r,r", args=[x.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _reduce_splits_kernel(
    part_out_ptr,  # fp32 [num_seqs, num_heads, NUM_SPLITS, head_dim]
    part_m_ptr,  # fp32 [num_seqs, num_heads, NUM_SPLITS]
    part_l_ptr,  # fp32 [num_seqs, num_heads, NUM_SPLITS]
    out_ptr,  # [num_seqs, num_heads, head_dim]
    stride_os,
    stride_oh,
    num_heads,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PDL: tl.constexpr = False,  # kernels/pdl.py
):
    pdl.enter(PDL)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    part = (seq * num_heads + head) * NUM_SPLITS + offs_s
    m = tl.load(part_m_ptr + part)
    l = tl.load(part_l_ptr + part)
    m_max = tl.max(m, 0)  # finite: the first split always holds the window's (or context's) first token
    w = tl.exp2(m - m_max)  # empty splits have m = -inf, so weight 0
    acc = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_NUM_SMS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises both paths
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, sms: int) -> int:
    """Split the context only while the (sequence, KV head) programs number at most SPLIT_PROGRAMS_PER_SM per SM.

    Then at least MIN_SPLITS, or ~4 programs per SM if that is more; never a split shorter than
    MIN_TOKENS_PER_SPLIT (MIN_TOKENS_PER_SPLIT_FEW where the programs would occupy at most FEW_PROGRAMS_PER_SM
    of the SMs); a power of two. A CUDA graph passes max_model_len as max_seq_len: the kernel cuts each
    sequence's own context into that many ranges.
    """
    rule = os.environ.get(SPLIT_RULE_ENV, "")
    programs = max(num_seqs * num_kv_heads, 1)
    few = programs <= FEW_PROGRAMS_PER_SM * sms
    if rule in ("s6", "s7"):  # the rules before (A/B runs)
        if programs >= 2 * sms:
            return 1
        want = max(1, (4 * sms) // programs)
        shortest = MIN_TOKENS_PER_SPLIT_FEW if few and rule == "s7" else 512
    else:
        if programs > SPLIT_PROGRAMS_PER_SM * sms:
            return 1
        want = max(MIN_SPLITS, (4 * sms) // programs)
        shortest = MIN_TOKENS_PER_SPLIT_FEW if few else MIN_TOKENS_PER_SPLIT
    most = max(1, max_seq_len // shortest)
    splits = min(want, most, MAX_SPLITS)
    return 1 << (splits.bit_length() - 1)  # round down to a power of two


FP8_KV_CONFIG: dict = {}
"""The launch over a float8 pool (head_dim <= 128, 16-bit queries) where it is not the 16-bit pool's. Empty: the
16-bit pool's, which won bench/fp8_where.py round 2's A/B of 13 launches inside an FP8-KV engine (H200, 256
sequences at ~388 tokens): 2.955 ms of attention per decode step with float16 dots (3.637 with bf16 dots, 3.205
unstaged, 3.489 at 3 stages, 4.7+ with PREFETCH), against 3.63 over a bf16 pool."""


def _decode_config(head_dim: int, dtype: torch.dtype, kv_fp8: bool = False) -> dict:
    if _interpreting():
        return dict(TILE_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(TILE_N=32, num_warps=4, num_stages=2)
    if kv_fp8 and head_dim <= 128 and FP8_KV_CONFIG:
        return dict(FP8_KV_CONFIG)
    if head_dim >= 256:
        return dict(TILE_N=32, num_warps=4, num_stages=3)
    # H200, bench/decode_sweep.py (bench/results/decode_sweep_2026-11-29_h200.json): 2 stages against 3,
    # KV read rate: 8B b256 ctx<=384 3.42 vs 3.37 TB/s, 1B (d 64) b256 2.89 vs 2.73, 1B b1024 3.66 vs 3.59,
    # 8B b64 ctx 2048 3.50 vs 3.50; within 1-2% of each shape's best of 27 configs.
    # Kept after bench/decode_fixed.py rounds 1-2 (bench/results/history_performance.md, "The 8B fixed workload"):
    # 8 warps read 2-3% faster at 256 equal contexts but 1-3.5% slower at 192-256 spread ones (and a mixed step's
    # decode rows ~3% slower); double-buffered K/V (5 stages) won at 48 and 96 sequences and lost at 64, 128 and
    # 192, each as its programs fill the GPU's slots in whole waves or not: no launch wins across batch sizes.
    return dict(TILE_N=64, num_warps=4, num_stages=2)


def paged_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    query_start_loc: torch.Tensor | None = None,
    warmup: bool = False,
    fp8_out: bool = False,
    fp8_ub: float | None = None,
):
    """Attention of q[i] (sequence i's newest token) over the first seq_lens[i] cached tokens.

    q [num_seqs, num_heads, head_dim]; kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim];
    block_tables int32 [num_seqs, max_blocks]; seq_lens int32 [num_seqs], each >= 1.
    num_splits None picks one from the sequence count, KV heads, max_seq_len and the SM count.
    sliding_window, logit_softcap, alibi_slopes, sinks: as in AttentionParams (docs/attention-seam.md);
    with a window, block-table entries of blocks wholly before it are never read.
    k_scale, v_scale: a float8_e4m3fn cache holds k / k_scale and v / v_scale (unused for other caches).
    query_start_loc: int32 [num_seqs + 1] of a mixed step whose q/out hold every new token: sequence i's
    row is query_start_loc[i], and only sequences with exactly one new token are attended to (the others'
    rows are left unwritten, for paged_prefill(skip_single=True)); one split.
    Returns out [num_seqs, num_heads, head_dim] in q's dtype ([num_tokens, ...] with query_start_loc).
    warmup: compile the decode kernel for this call's launch without running it (benchmarks compile their
    candidates in parallel); out is left unwritten.
    fp8_out: also return the output quantized per token for an FP8 linear layer, (out, float8_e4m3fn
    [num_seqs, num_heads * head_dim], float32 scales [num_seqs, 1]) (amax bounded by fp8_ub), the bits of
    kernels/fp8_quant.py's quantize_fp8_rows(out): with one split and contiguous rows the kernel does it (each
    sequence's last program to finish), else that function.
    """
    if query_start_loc is not None:
        return _decode_rows_of_mixed_step(q, kv_cache, block_tables, seq_lens, scale, query_start_loc, out, config,
                                          sliding_window, logit_softcap, alibi_slopes, sinks, k_scale, v_scale)
    num_seqs, num_heads, head_dim = q.shape
    check_paged_inputs(q, kv_cache, block_tables, seq_lens, num_seqs, "num_seqs")
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if fp8:
        check_kv_scales(k_scale, v_scale)
        scale = scale * k_scale  # q . (k / k_scale) * (scale * k_scale) = scale * q . k
    variants = kernel_variants(scale, num_heads, q.device, sliding_window, logit_softcap, alibi_slopes, sinks)
    num_kv_heads = kv_cache.shape[3]
    if out is None:
        out = torch.empty_like(q)
    quant = None
    if fp8_out:
        quant = (torch.empty(num_seqs, num_heads * head_dim, dtype=torch.float8_e4m3fn, device=q.device),
                 torch.empty(num_seqs, 1, dtype=torch.float32, device=q.device))
    if num_seqs == 0:
        return (out, *quant) if fp8_out else out
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max().item())
        if sliding_window is not None:
            max_seq_len = min(max_seq_len, sliding_window)  # the keys a query actually reads
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, num_sms(q.device))
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two >= 1; got {num_splits}")
    cfg = dict(_decode_config(head_dim, q.dtype, fp8), **(config or {}))
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_out = part_m = part_l = out  # unused
    in_kernel = fp8_out and num_splits == 1 and out.stride(2) == 1 and out.stride(1) == head_dim
    fused = {}
    if in_kernel:
        fused = dict(FP8_OUT=True, q8_ptr=quant[0], s8_ptr=quant[1],
                     count_ptr=fp8_quant.arrival_counts(q.device, num_seqs), ub=float(fp8_ub or 0.0),
                     HAS_UB=fp8_ub is not None, HW_CVT=fp8_quant.HW_CVT and q.is_cuda,
                     OUT_BLOCK=triton.next_power_of_2(num_heads * head_dim))
    _launch(q, kv_cache, block_tables, seq_lens, seq_lens, out, (part_out, part_m, part_l), num_seqs, num_splits,
            cfg, variants, fp8, v_scale, rows_from_qsl=False, warmup=warmup, fused=fused)
    if num_splits > 1 and not warmup:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            part_out, part_m, part_l, out, out.stride(0), out.stride(1), num_heads,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad(head_dim), NUM_SPLITS=num_splits,
            num_warps=4 if head_dim * num_splits >= 2048 else 2, **pdl.args(q),
        )
    if fp8_out and not in_kernel and not warmup:
        quant = fp8_quant.quantize_fp8_rows(out.reshape(num_seqs, num_heads * head_dim), ub=fp8_ub)
    return (out, *quant) if fp8_out else out


def _launch(q, kv_cache, block_tables, seq_lens, query_start_loc, out, parts, num_seqs: int, num_splits: int,
            cfg: dict, variants, fp8: bool, v_scale: float, rows_from_qsl: bool, warmup: bool = False,
            fused: dict | None = None) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    part_out, part_m, part_l = parts
    heads_fastest = cfg.get("HEADS_FASTEST", True) and num_seqs < 65536  # grid y limit
    grid = (num_kv_heads, num_seqs, num_splits) if heads_fastest else (num_seqs, num_kv_heads, num_splits)
    kernel = partial(_paged_decode_kernel.warmup, grid=grid) if warmup else _paged_decode_kernel[grid]
    kernel(
        q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out, part_out, part_m, part_l,
        stride_qs=q.stride(0), stride_qh=q.stride(1), stride_os=out.stride(0), stride_oh=out.stride(1),
        stride_bt=block_tables.stride(0),
        stride_cb=key_cache.stride(0), stride_cs=key_cache.stride(1), stride_ch=key_cache.stride(2),
        num_heads=num_heads,
        QUERIES_PER_KV=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad(head_dim),
        D_MASKED=head_dim != head_dim_pad(head_dim),
        BLOCK_SIZE=block_size,
        TILE_N=cfg["TILE_N"],
        NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        EVICTION=cfg.get("EVICTION", ""),
        HEADS_FASTEST=heads_fastest,
        KV_FP8=fp8,
        F16_DOTS=fp8 and q.dtype == torch.bfloat16 and cfg.get("F16_DOTS", True),
        CVT_BITS=fp8 and q.dtype == torch.bfloat16 and cfg.get("F16_DOTS", True) and cfg.get("CVT_BITS", False)
        and not _interpreting(),
        PREFETCH=cfg.get("PREFETCH", False),
        ROWS_FROM_QSL=rows_from_qsl,
        v_scale=v_scale,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **variants.launch_args(seq_lens),
        **pdl.args(q),
        **(fused or {}),
    )


def _decode_rows_of_mixed_step(q, kv_cache, block_tables, seq_lens, scale, query_start_loc, out, config,
                               sliding_window, logit_softcap, alibi_slopes, sinks, k_scale, v_scale) -> torch.Tensor:
    """paged_decode(query_start_loc=...): the one-token sequences of a mixed step, in its token rows."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = query_start_loc.shape[0] - 1
    check_paged_inputs(q, kv_cache, block_tables, seq_lens, num_seqs, "num_tokens")
    check_query_start_loc(query_start_loc)
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if fp8:
        check_kv_scales(k_scale, v_scale)
        scale = scale * k_scale
    variants = kernel_variants(scale, num_heads, q.device, sliding_window, logit_softcap, alibi_slopes, sinks)
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0 or num_tokens == 0:
        return out
    cfg = dict(_decode_config(head_dim, q.dtype, fp8), **(config or {}))
    _launch(q, kv_cache, block_tables, seq_lens, query_start_loc, out, (out, out, out), num_seqs, 1, cfg, variants,
            fp8, v_scale, rows_from_qsl=True)
    return out


def paged_decode_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Torch reference of paged_decode (float32 math, output in q's dtype; an fp8 cache dequantized first)."""
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if not fp8:
        k_scale = v_scale = 1.0
    pool = kv_cache.view(torch.uint8) if fp8 else kv_cache  # gather bytes: float8 indexing is missing on some devices
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty_like(q)
    for i in range(num_seqs):
        n = int(seq_lens[i])
        blocks = block_tables[i, : (n + block_size - 1) // block_size].long()
        k = pool[0, blocks].reshape(-1, num_kv_heads, head_dim)[:n].view(kv_cache.dtype).float() * k_scale
        v = pool[1, blocks].reshape(-1, num_kv_heads, head_dim)[:n].view(kv_cache.dtype).float() * v_scale
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [n, num_heads, head_dim]
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)
    return out
