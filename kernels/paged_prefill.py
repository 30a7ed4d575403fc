"""Paged prefill / extend attention: a variable-length chunk of new tokens per sequence, causal.

The cache already holds this step's K/V (reshape_and_cache ran first), so sequence i's chunk of
q_len new tokens sits at positions seq_len - q_len ... seq_len - 1 and attends to every cached
position up to its own. One launch serves a whole step: prefill chunks, prefix-cache extends and
decodes (q_len 1) together.

FlashAttention-2 style: a program owns BLOCK_M query rows and streams BLOCK_N-token K/V tiles through
an online softmax with tl.dot. With PACK_GQA the rows are (token, query head) pairs: BLOCK_Q = BLOCK_M // G
tokens times the G query heads that share the KV head, so each K/V tile is read once for its whole
group and a decode token still fills G rows; without it a program owns BLOCK_M tokens of one head.

Two key sources. Keys before the chunk (the cached prefix) are gathered through the block table. The
chunk's own keys are read, with NEW_KV, from the step's contiguous k/v (the tensors reshape_and_cache
just wrote: the same values) with plain loads (NEW_KV_PTR) or TMA tensor descriptors (NEW_KV_TMA);
without NEW_KV they too come through the block table. Within each source the tiles wholly visible
to every row of the program take an unmasked loop; only the diagonal (and a window's leading edge,
and a source's last partial tile) take the masked one.

Programs map to (sequence, query tile) without a host sync: sequence i's tiles start at
query_start_loc[i] // BLOCK_Q + i (an upper bound on the tiles before it), so the grid is
num_tokens // BLOCK_Q + num_seqs and each program finds its sequence by binary search; spare
programs of a sequence exit at once. With CHUNK_LIST (a mixed step's host-made list of the sequences with more than
one new token, `chunk_list`) a persistent grid walks those sequences' tiles alone: the decode rows (skip_single), a
slot and a search each in the plain grid, cost nothing. With REVERSE a sequence's last (longest) query tiles run first.
With HEAVY_FIRST (and the host's max_query_len) the grid is instead num_seqs x the longest chunk's tiles, slot
r * num_seqs + i being sequence i's chunk tile max_q_tiles - 1 - r: no search, and within a head group every
sequence's heaviest tiles run before any lighter one (longest-processing-time order for fresh prompts).

An fp8 cache (float8_e4m3fn, KV_FP8) is upcast to q's dtype as each tile is loaded; k_scale rides in the
softmax scale (the host multiplies them) and v_scale multiplies the output once at the end. The
contiguous k/v are not quantized, so an fp8 cache reads every key through the block table.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.paged_checks import check_kv_scales, check_paged_inputs, check_query_start_loc
from kernels.paged_common import base2_scores, head_dim_pad, kernel_variants, load_tile
from kernels.paged_prefill_configs import BASE, heavy_first_tiles, select_config
from kernels.splitk import sm_count

try:  # Hopper's Gluon kernel for fresh prompts (config GLUON); absent from older Triton builds
    from kernels import paged_prefill_gluon
except ImportError:  # pragma: no cover - depends on the installed Triton
    paged_prefill_gluon = None

# Where the chunk's own keys come from (the NEW_KV constexpr).
NEW_KV_PAGED, NEW_KV_PTR, NEW_KV_TMA = 0, 1, 2
NEW_KV_MODES = {"paged": NEW_KV_PAGED, "ptr": NEW_KV_PTR, "tma": NEW_KV_TMA}


@triton.jit
def _find_seq(query_start_loc_ptr, seq_lens_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr, SEQ_VEC: tl.constexpr):
    """(sequence, its first query row, its query count, its context length) of the program's `tile`: the
    sequence is the last i with query_start_loc[i] // BLOCK_Q + i <= tile."""
    if SEQ_VEC > 0:
        # num_seqs < SEQ_VEC (the host checks): one vector load of each array and a few reductions rather
        # than a chain of dependent loads (binary search, then the sequence's entries) at the program's start.
        idx = tl.arange(0, SEQ_VEC)
        starts = tl.load(query_start_loc_ptr + idx, mask=idx <= num_seqs, other=0)
        lens = tl.load(seq_lens_ptr + idx, mask=idx < num_seqs, other=0)
        before = (starts // BLOCK_Q + idx <= tile) & (idx < num_seqs)
        seq = tl.sum(before.to(tl.int32), 0) - 1
        q_start = tl.sum(tl.where(idx == seq, starts, 0), 0)
        q_len = tl.sum(tl.where(idx == seq + 1, starts, 0), 0) - q_start
        seq_len = tl.sum(tl.where(idx == seq, lens, 0), 0)
    else:
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
            if first_tile <= tile:
                lo = mid + 1
            else:
                hi = mid
        seq = lo - 1
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + seq)
    return seq, q_start, q_len, seq_len


@triton.jit
def _load_kv(k_cache_ptr, v_cache_ptr, k_new, v_new, block_table, head_off, kv_head, new_row0, start, a, b,
             offs_n, offs_d, d_ok, stride_cb, stride_cs, stride_kt, stride_kh, stride_vt, stride_vh,
             SOURCE: tl.constexpr, MASKED: tl.constexpr, D_MASKED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCKWISE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """K and V [BLOCK_N, HEAD_DIM_PAD] of key positions start ... start + BLOCK_N - 1, and which of
    them lie in [a, b) (only computed when MASKED; an unmasked tile lies wholly inside)."""
    pos = start + offs_n
    valid = (pos >= a) & (pos < b)
    if SOURCE == 0:
        # The cache. Keys outside [a, b) are never loaded: before a window their blocks may be freed.
        if BLOCKWISE:
            # One block-table entry per BLOCK_SIZE keys rather than one lookup per key.
            nb = tl.arange(0, BLOCK_N // BLOCK_SIZE)
            first = start + nb * BLOCK_SIZE
            if MASKED:
                ids = tl.load(block_table + first // BLOCK_SIZE, mask=(first + BLOCK_SIZE > a) & (first < b), other=0)
            else:
                ids = tl.load(block_table + first // BLOCK_SIZE)
            in_block = tl.arange(0, BLOCK_SIZE) * stride_cs
            tok_off = tl.reshape(ids.to(tl.int64)[:, None] * stride_cb + in_block[None, :], [BLOCK_N]) + head_off
        else:
            if MASKED:
                block = tl.load(block_table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            else:
                block = tl.load(block_table + pos // BLOCK_SIZE).to(tl.int64)
            tok_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + head_off
        kv_off = tok_off[:, None] + offs_d[None, :]
        k = load_tile(k_cache_ptr + kv_off, valid, d_ok, MASKED, D_MASKED, "")
        v = load_tile(v_cache_ptr + kv_off, valid, d_ok, MASKED, D_MASKED, "")
    elif SOURCE == 1:
        # The step's contiguous k/v: key position p of this sequence is row new_row0 + p.
        rows = (new_row0 + pos).to(tl.int64)
        k = load_tile(k_new + rows[:, None] * stride_kt + (kv_head * stride_kh + offs_d)[None, :], valid, d_ok,
                      MASKED, D_MASKED, "")
        v = load_tile(v_new + rows[:, None] * stride_vt + (kv_head * stride_vh + offs_d)[None, :], valid, d_ok,
                      MASKED, D_MASKED, "")
    else:
        # TMA over k/v viewed as [num_tokens, num_kv_heads * HEAD_DIM]. Rows past the tile's source
        # range are other sequences' keys or zero fill (past num_tokens): finite, and masked out below.
        k = k_new.load([new_row0 + start, kv_head * HEAD_DIM])
        v = v_new.load([new_row0 + start, kv_head * HEAD_DIM])
    return k, v, pos, valid


@triton.jit
def _finite_or_zero(m, USE_WINDOW: tl.constexpr):
    """The running max to subtract. With a window a row whose window starts after every key seen so far
    still has max -inf: subtract 0 there (its p is 0) rather than compute exp2(-inf - -inf). Without a
    window key 0 is in every row's first tile, so the max is finite from the first tile on."""
    if USE_WINDOW:
        return tl.where(m == float("-inf"), 0.0, m)
    else:
        return m


@triton.jit
def _scores(q, k, pos, q_pos, slopes2, qk_scale, softcap_in, softcap_out2, USE_SOFTCAP: tl.constexpr,
            USE_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr):
    """q . k^T [BLOCK_M, BLOCK_N]: raw logits, or base-2 ones with soft-cap / ALiBi (see _fold's scale)."""
    if KV_FP8:
        k = k.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if USE_SOFTCAP or USE_ALIBI:
        s = base2_scores(s, pos, q_pos, slopes2, qk_scale, softcap_in, softcap_out2, USE_SOFTCAP, USE_ALIBI)
    return s


@triton.jit
def _mask_scores(s, pos, valid, q_pos, window, USE_WINDOW: tl.constexpr):
    """-inf where a key is outside [a, b) (valid) or after the row's position (or before its window)."""
    keep = (pos[None, :] <= q_pos[:, None]) & valid[None, :]
    if USE_WINDOW:
        keep &= pos[None, :] > q_pos[:, None] - window
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _fold(s, v, acc, m_i, l_i, pos, valid, q_pos, window, qk_scale, mask_now, MASKED: tl.constexpr,
          USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_WINDOW: tl.constexpr,
          DOT_PRECISION: tl.constexpr, LAZY_RESCALE: tl.constexpr):
    """Fold one tile's scores s and values v (in q's dtype) into the online softmax (acc, running max m_i,
    sum l_i). MASKED 1: mask the keys outside [a, b) and past each row (valid, q_pos); MASKED 2: the same only
    where the runtime flag mask_now is set (ONE_LOOP 2's tiles share one loop body)."""
    if USE_SOFTCAP or USE_ALIBI:
        scale = 1.0  # _scores returned base-2 logits
    else:
        scale = qk_scale  # raw logits; the scale rides in the exp2's FMA
    if MASKED == 2:
        if mask_now:
            s = _mask_scores(s, pos, valid, q_pos, window, USE_WINDOW)
    elif MASKED:
        s = _mask_scores(s, pos, valid, q_pos, window, USE_WINDOW)
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    if LAZY_RESCALE:
        # Keep a stale max (p up to 2^8, exact after the final acc / l) unless some row's grew by more
        # than 8 (base 2): most tiles then skip rescaling acc, which waits for the previous PV MMA.
        if tl.max((m_new > m_i + 8.0).to(tl.int32), 0) > 0:
            alpha = tl.exp2(m_i - _finite_or_zero(m_new, USE_WINDOW))
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        p = tl.exp2(s * scale - _finite_or_zero(m_i, USE_WINDOW)[:, None])
        l_i += tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    else:
        m_sub = _finite_or_zero(m_new, USE_WINDOW)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s * scale - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # accumulate in the MMA
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _online_softmax(q, acc, m_i, l_i, k, v, pos, valid, q_pos, slopes2, window, qk_scale, softcap_in,
                    softcap_out2, mask_now, MASKED: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr,
                    USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
                    LAZY_RESCALE: tl.constexpr):
    s = _scores(q, k, pos, q_pos, slopes2, qk_scale, softcap_in, softcap_out2, USE_SOFTCAP, USE_ALIBI,
                DOT_PRECISION, KV_FP8)
    if KV_FP8:
        v = v.to(q.dtype)
    return _fold(s, v, acc, m_i, l_i, pos, valid, q_pos, window, qk_scale, mask_now, MASKED, USE_SOFTCAP, USE_ALIBI,
                 USE_WINDOW, DOT_PRECISION, LAZY_RESCALE)


@triton.jit
def _tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, k_new, v_new, block_table, head_off, kv_head, new_row0,
          start, a, b, offs_n, q_pos, slopes2, window, qk_scale, softcap_in, softcap_out2, offs_d, d_ok, stride_cb,
          stride_cs, stride_kt, stride_kh, stride_vt, stride_vh, mask_now, SOURCE: tl.constexpr, MASKED: tl.constexpr,
          D_MASKED: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKWISE: tl.constexpr,
          HEAD_DIM: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_WINDOW: tl.constexpr,
          DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, LAZY_RESCALE: tl.constexpr):
    """One BLOCK_N tile of keys from `start`: load it and fold it into the online softmax."""
    k, v, pos, valid = _load_kv(k_cache_ptr, v_cache_ptr, k_new, v_new, block_table, head_off, kv_head, new_row0,
                                start, a, b, offs_n, offs_d, d_ok, stride_cb, stride_cs, stride_kt, stride_kh,
                                stride_vt, stride_vh, SOURCE, MASKED, D_MASKED, BLOCK_SIZE, BLOCK_N, BLOCKWISE,
                                HEAD_DIM)
    return _online_softmax(q, acc, m_i, l_i, k, v, pos, valid, q_pos, slopes2, window, qk_scale, softcap_in,
                           softcap_out2, mask_now, MASKED, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, DOT_PRECISION, KV_FP8,
                           LAZY_RESCALE)


@triton.jit
def _attend_span(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, k_new, v_new, block_table, head_off, kv_head,
                 new_row0, origin, a, b, free_a, free_b, q_pos, slopes2, window, qk_scale, softcap_in,
                 softcap_out2, offs_d, d_ok, stride_cb, stride_cs, stride_kt, stride_kh, stride_vt,
                 stride_vh, SOURCE: tl.constexpr, D_MASKED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCKWISE: tl.constexpr, HEAD_DIM: tl.constexpr,
                 USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_WINDOW: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, LAZY_RESCALE: tl.constexpr,
                 LOOP_STAGES: tl.constexpr, LOOP_UNROLL: tl.constexpr, LOOP_WS: tl.constexpr,
                 OVERLAP_QK: tl.constexpr, ONE_LOOP: tl.constexpr):
    """Keys [a, b) of one source in BLOCK_N tiles starting at `origin`. Keys in [free_a, free_b) are
    visible to every row (free_a >= a, free_b <= b): tiles wholly inside take the unmasked loop, which
    alone carries the tl.range attributes (LOOP_STAGES > 0: its own pipeline depth; LOOP_UNROLL > 1;
    LOOP_WS: Triton's automatic warp specialization); the masked edges are a tile or two.
    ONE_LOOP > 0 runs the free tiles and the trailing masked ones in one loop instead (one pipeline, so the
    diagonal's loads are prefetched during the last free tile rather than waited for after the loop): every
    tile masked (1), or only those past free_b by a runtime branch (2)."""
    offs_n = tl.arange(0, BLOCK_N)
    t_lo = (a - origin) // BLOCK_N
    t_hi = tl.where(b > a, tl.cdiv(b - origin, BLOCK_N), t_lo)
    f_lo = tl.minimum(tl.maximum(tl.cdiv(free_a - origin, BLOCK_N), t_lo), t_hi)
    f_hi = tl.minimum(tl.maximum((free_b - origin) // BLOCK_N, f_lo), t_hi)
    if USE_WINDOW:  # the window's leading edge; without a window a == free_a and this loop is empty
        for t in range(t_lo, f_lo):
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, k_new, v_new, block_table, head_off,
                                  kv_head, new_row0, origin + t * BLOCK_N, a, b, offs_n, q_pos, slopes2, window,
                                  qk_scale, softcap_in, softcap_out2, offs_d, d_ok, stride_cb, stride_cs, stride_kt,
                                  stride_kh, stride_vt, stride_vh, True, SOURCE, True, D_MASKED, BLOCK_SIZE, BLOCK_N,
                                  BLOCKWISE, HEAD_DIM, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, DOT_PRECISION, KV_FP8,
                                  LAZY_RESCALE)
    if ONE_LOOP > 0:
        for t in range(f_lo, t_hi):
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, k_new, v_new, block_table, head_off,
                                  kv_head, new_row0, origin + t * BLOCK_N, a, b, offs_n, q_pos, slopes2, window,
                                  qk_scale, softcap_in, softcap_out2, offs_d, d_ok, stride_cb, stride_cs, stride_kt,
                                  stride_kh, stride_vt, stride_vh, t >= f_hi, SOURCE, ONE_LOOP, D_MASKED, BLOCK_SIZE,
                                  BLOCK_N, BLOCKWISE, HEAD_DIM, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, DOT_PRECISION,
                                  KV_FP8, LAZY_RESCALE)
    elif OVERLAP_QK and SOURCE == 2:
        # Software-pipelined by hand (FlashAttention-3's intra-warpgroup overlap): the next tile's QK^T is
        # issued before this tile's softmax, so the tensor cores have work while the softmax runs, if the
        # compiler leaves the wait for that MMA until its scores are used. V is loaded where it is used.
        if f_hi > f_lo:
            pos = origin + f_lo * BLOCK_N + offs_n
            k = k_new.load([new_row0 + origin + f_lo * BLOCK_N, kv_head * HEAD_DIM])
            s = _scores(q, k, pos, q_pos, slopes2, qk_scale, softcap_in, softcap_out2, USE_SOFTCAP, USE_ALIBI,
                        DOT_PRECISION, False)
            for t in range(f_lo + 1, f_hi):
                pos_next = origin + t * BLOCK_N + offs_n
                k = k_new.load([new_row0 + origin + t * BLOCK_N, kv_head * HEAD_DIM])
                s_next = _scores(q, k, pos_next, q_pos, slopes2, qk_scale, softcap_in, softcap_out2, USE_SOFTCAP,
                                 USE_ALIBI, DOT_PRECISION, False)
                v = v_new.load([new_row0 + origin + (t - 1) * BLOCK_N, kv_head * HEAD_DIM])
                acc, m_i, l_i = _fold(s, v, acc, m_i, l_i, pos, pos >= 0, q_pos, window, qk_scale, False, False,
                                      USE_SOFTCAP, USE_ALIBI, USE_WINDOW, DOT_PRECISION, LAZY_RESCALE)
                s = s_next
                pos = pos_next
            v = v_new.load([new_row0 + origin + (f_hi - 1) * BLOCK_N, kv_head * HEAD_DIM])
            acc, m_i, l_i = _fold(s, v, acc, m_i, l_i, pos, pos >= 0, q_pos, window, qk_scale, False, False,
                                  USE_SOFTCAP, USE_ALIBI, USE_WINDOW, DOT_PRECISION, LAZY_RESCALE)
    elif LOOP_WS:
        for t in tl.range(f_lo, f_hi, warp_specialize=True):
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, k_new, v_new, block_table, head_off,
                                  kv_head, new_row0, origin + t * BLOCK_N, a, b, offs_n, q_pos, slopes2, window,
                                  qk_scale, softcap_in, softcap_out2, offs_d, d_ok, stride_cb, stride_cs, stride_kt,
                                  stride_kh, stride_vt, stride_vh, False, SOURCE, False, D_MASKED, BLOCK_SIZE, BLOCK_N,
                                  BLOCKWISE, HEAD_DIM, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, DOT_PRECISION, KV_FP8,
                                  LAZY_RESCALE)
    elif LOOP_STAGES > 0:
        for t in tl.range(f_lo, f_hi, num_stages=LOOP_STAGES, loop_unroll_factor=LOOP_UNROLL):
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, k_new, v_new, block_table, head_off,
                                  kv_head, new_row0, origin + t * BLOCK_N, a, b, offs_n, q_pos, slopes2, window,
                                  qk_scale, softcap_in, softcap_out2, offs_d, d_ok, stride_cb, stride_cs, stride_kt,
                                  stride_kh, stride_vt, stride_vh, False, SOURCE, False, D_MASKED, BLOCK_SIZE, BLOCK_N,
                                  BLOCKWISE, HEAD_DIM, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, DOT_PRECISION, KV_FP8,
                                  LAZY_RESCALE)
    elif LOOP_UNROLL > 1:
        for t in tl.range(f_lo, f_hi, loop_unroll_factor=LOOP_UNROLL):
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, k_new, v_new, block_table, head_off,
                                  kv_head, new_row0, origin + t * BLOCK_N, a, b, offs_n, q_pos, slopes2, window,
                                  qk_scale, softcap_in, softcap_out2, offs_d, d_ok, stride_cb, stride_cs, stride_kt,
                                  stride_kh, stride_vt, stride_vh, False, SOURCE, False, D_MASKED, BLOCK_SIZE, BLOCK_N,
                                  BLOCKWISE, HEAD_DIM, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, DOT_PRECISION, KV_FP8,
                                  LAZY_RESCALE)
    else:
        for t in range(f_lo, f_hi):
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, k_new, v_new, block_table, head_off,
                                  kv_head, new_row0, origin + t * BLOCK_N, a, b, offs_n, q_pos, slopes2, window,
                                  qk_scale, softcap_in, softcap_out2, offs_d, d_ok, stride_cb, stride_cs, stride_kt,
                                  stride_kh, stride_vt, stride_vh, False, SOURCE, False, D_MASKED, BLOCK_SIZE, BLOCK_N,
                                  BLOCKWISE, HEAD_DIM, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, DOT_PRECISION, KV_FP8,
                                  LAZY_RESCALE)
    if ONE_LOOP == 0:
        for t in range(f_hi, t_hi):
            acc, m_i, l_i = _tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, k_new, v_new, block_table, head_off,
                                  kv_head, new_row0, origin + t * BLOCK_N, a, b, offs_n, q_pos, slopes2, window,
                                  qk_scale, softcap_in, softcap_out2, offs_d, d_ok, stride_cb, stride_cs, stride_kt,
                                  stride_kh, stride_vt, stride_vh, True, SOURCE, True, D_MASKED, BLOCK_SIZE, BLOCK_N,
                                  BLOCKWISE, HEAD_DIM, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, DOT_PRECISION, KV_FP8,
                                  LAZY_RESCALE)
    return acc, m_i, l_i


@triton.jit
def _attend_q_tile(q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, k_tail, v_tail, block_tables_ptr, out_ptr,
                   slopes_ptr, sinks_ptr,
                   qk_scale, softcap_in, softcap_out2, window, v_scale, stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_bt, stride_cb, stride_cs, stride_ch, stride_kt, stride_kh, stride_vt, stride_vh,
                   seq, q_start, q_len, seq_len, q_tile, head0, kv_head,
                   ROW_HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_N_PAGED: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   D_MASKED: tl.constexpr, BLOCK_SIZE: tl.constexpr, NEW_KV: tl.constexpr, BLOCKWISE: tl.constexpr,
                   USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_WINDOW: tl.constexpr,
                   USE_SINKS: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
                   LAZY_RESCALE: tl.constexpr, HAS_PREFIX: tl.constexpr, Q_SCALED: tl.constexpr,
                   LOOP_STAGES: tl.constexpr, LOOP_UNROLL: tl.constexpr, LOOP_WS: tl.constexpr,
                   OVERLAP_QK: tl.constexpr, BLOCK_N_TAIL: tl.constexpr, ONE_LOOP: tl.constexpr):
    """Query tile q_tile (BLOCK_Q tokens x ROW_HEADS heads from head0) of sequence seq: attend and store."""
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    q_idx = q_tile * BLOCK_Q + offs_m // ROW_HEADS  # token within the chunk
    heads = head0 + offs_m % ROW_HEADS
    row_valid = (offs_m < BLOCK_Q * ROW_HEADS) & (q_idx < q_len)
    q_pos = ctx_len + q_idx
    q_rows = (q_start + q_idx).to(tl.int64)
    q = load_tile(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                  row_valid, d_ok, True, D_MASKED, "")
    if Q_SCALED and not (USE_SOFTCAP or USE_ALIBI):
        # Fold the base-2 softmax scale into q once (rounded to q's dtype, as FlashAttention-3 does) rather
        # than scale each tile's scores; soft-cap and ALiBi need the raw scores, so they keep the scale.
        q = (q.to(tl.float32) * qk_scale).to(q.dtype)
        qk_scale = 1.0

    if USE_SINKS:
        # The sink is a key with logit sinks[h] and no value: start the running max and sum from it.
        m_i = tl.load(sinks_ptr + heads, mask=row_valid, other=float("-inf")) * 1.4426950408889634
        l_i = tl.where(row_valid, 1.0, 0.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        slopes2 = tl.load(slopes_ptr + heads, mask=row_valid, other=0.0) * 1.4426950408889634
    else:
        slopes2 = m_i  # unused
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kv_head * stride_ch
    new_row0 = q_start - ctx_len  # the contiguous k/v row of key position p is new_row0 + p

    first_pos = ctx_len + q_tile * BLOCK_Q
    last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
    if USE_WINDOW:
        # Keys before the first row's window are never read; keys inside the last row's window (and
        # at or before the first row) are visible to every row.
        key_lo = tl.maximum(first_pos - window + 1, 0)
        free_lo = tl.maximum(last_pos - window + 1, 0)
    else:
        key_lo = 0
        free_lo = 0
    if NEW_KV == 0:
        acc, m_i, l_i = _attend_span(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, k_new, v_new, block_table,
                                     head_off, kv_head, new_row0, 0, key_lo, last_pos + 1, free_lo, first_pos + 1,
                                     q_pos, slopes2, window, qk_scale, softcap_in, softcap_out2, offs_d,
                                     d_ok, stride_cb, stride_cs, stride_kt, stride_kh, stride_vt, stride_vh, 0,
                                     D_MASKED, BLOCK_SIZE, BLOCK_N, BLOCKWISE, HEAD_DIM, USE_SOFTCAP, USE_ALIBI,
                                     USE_WINDOW, DOT_PRECISION, KV_FP8, LAZY_RESCALE,
                                     LOOP_STAGES, LOOP_UNROLL, LOOP_WS, OVERLAP_QK, ONE_LOOP)
    else:
        # The cached prefix (every key before every row: only the window and its end are masked), then
        # the chunk's own keys in tiles starting at ctx_len. Without HAS_PREFIX (a launch of fresh prompts
        # only) the block-table path is not compiled at all.
        if HAS_PREFIX:
            acc, m_i, l_i = _attend_span(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, k_new, v_new, block_table,
                                         head_off, kv_head, new_row0, 0, key_lo, ctx_len, free_lo, ctx_len,
                                         q_pos, slopes2, window, qk_scale, softcap_in, softcap_out2, offs_d,
                                         d_ok, stride_cb, stride_cs, stride_kt, stride_kh, stride_vt, stride_vh, 0,
                                         D_MASKED, BLOCK_SIZE, BLOCK_N_PAGED, BLOCKWISE, HEAD_DIM, USE_SOFTCAP,
                                         USE_ALIBI, USE_WINDOW, DOT_PRECISION, KV_FP8, LAZY_RESCALE,
                                     LOOP_STAGES, LOOP_UNROLL, LOOP_WS, OVERLAP_QK, ONE_LOOP)
        if BLOCK_N_TAIL < BLOCK_N and not USE_WINDOW:
            # The whole BLOCK_N tiles every row sees, unmasked; then the diagonal from the first key some
            # row does not see, in narrower BLOCK_N_TAIL tiles (less of each masked tile is thrown away).
            bulk_end = ctx_len + ((first_pos + 1 - ctx_len) // BLOCK_N) * BLOCK_N
            acc, m_i, l_i = _attend_span(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, k_new, v_new, block_table,
                                         head_off, kv_head, new_row0, ctx_len, ctx_len, bulk_end, ctx_len, bulk_end,
                                         q_pos, slopes2, window, qk_scale, softcap_in, softcap_out2, offs_d,
                                         d_ok, stride_cb, stride_cs, stride_kt, stride_kh, stride_vt, stride_vh,
                                         NEW_KV, D_MASKED, BLOCK_SIZE, BLOCK_N, BLOCKWISE, HEAD_DIM, USE_SOFTCAP,
                                         USE_ALIBI, USE_WINDOW, DOT_PRECISION, KV_FP8, LAZY_RESCALE,
                                         LOOP_STAGES, LOOP_UNROLL, LOOP_WS, OVERLAP_QK, ONE_LOOP)
            acc, m_i, l_i = _attend_span(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, k_tail, v_tail, block_table,
                                         head_off, kv_head, new_row0, bulk_end, bulk_end, last_pos + 1, bulk_end,
                                         first_pos + 1, q_pos, slopes2, window, qk_scale, softcap_in, softcap_out2,
                                         offs_d, d_ok, stride_cb, stride_cs, stride_kt, stride_kh, stride_vt,
                                         stride_vh, NEW_KV, D_MASKED, BLOCK_SIZE, BLOCK_N_TAIL, BLOCKWISE, HEAD_DIM,
                                         USE_SOFTCAP, USE_ALIBI, USE_WINDOW, DOT_PRECISION, KV_FP8, LAZY_RESCALE,
                                         0, 0, False, False, ONE_LOOP)
        else:
            acc, m_i, l_i = _attend_span(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, k_new, v_new, block_table,
                                         head_off, kv_head, new_row0, ctx_len, tl.maximum(key_lo, ctx_len),
                                         last_pos + 1, tl.maximum(free_lo, ctx_len), first_pos + 1,
                                         q_pos, slopes2, window, qk_scale, softcap_in, softcap_out2, offs_d,
                                         d_ok, stride_cb, stride_cs, stride_kt, stride_kh, stride_vt, stride_vh,
                                         NEW_KV, D_MASKED, BLOCK_SIZE, BLOCK_N, BLOCKWISE, HEAD_DIM, USE_SOFTCAP,
                                         USE_ALIBI, USE_WINDOW, DOT_PRECISION, KV_FP8, LAZY_RESCALE,
                                         LOOP_STAGES, LOOP_UNROLL, LOOP_WS, OVERLAP_QK, ONE_LOOP)

    out = acc / l_i[:, None]
    if KV_FP8:
        out = out * v_scale
    o_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    if D_MASKED:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_ok[None, :])
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])



@triton.jit
def _work_item(tile, head_group, q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, k_tail, v_tail, block_tables_ptr, seq_lens_ptr,
               query_start_loc_ptr, out_ptr, slopes_ptr, sinks_ptr, qk_scale, softcap_in, softcap_out2, window,
               v_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_cs, stride_ch,
               stride_kt, stride_kh, stride_vt, stride_vh, num_seqs, max_q_tiles,
               QUERIES_PER_KV: tl.constexpr, ROW_HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_PAGED: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, D_MASKED: tl.constexpr, BLOCK_SIZE: tl.constexpr, NEW_KV: tl.constexpr, BLOCKWISE: tl.constexpr, REVERSE: tl.constexpr, PAIR_TILES: tl.constexpr, SEQ_VEC: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, LAZY_RESCALE: tl.constexpr, HAS_PREFIX: tl.constexpr, Q_SCALED: tl.constexpr, LOOP_STAGES: tl.constexpr, LOOP_UNROLL: tl.constexpr, LOOP_WS: tl.constexpr, OVERLAP_QK: tl.constexpr, SKIP_SINGLE: tl.constexpr, BLOCK_N_TAIL: tl.constexpr, ONE_LOOP: tl.constexpr, HEAVY_FIRST: tl.constexpr):
    """One program's work: query tile slot `tile` (of the grid's tile axis, see the module docstring) of
    query-head group `head_group`; spare slots of a sequence do nothing."""
    head0 = head_group * ROW_HEADS
    kv_head = head0 // QUERIES_PER_KV
    if HEAVY_FIRST:
        # tile = r * num_seqs + seq: every sequence's chunk tile max_q_tiles - 1 - r runs before any sequence's
        # tile below it, so a launch of fresh prompts starts its heaviest tiles first (longest-processing-time
        # order, within each head group), and the sequence is the tile's index itself: no search before q.
        seq = tile % num_seqs
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + seq)
        q_tile = max_q_tiles - 1 - tile // num_seqs
        if SKIP_SINGLE:
            run = q_len != 1
        else:
            run = q_len >= 0
        if run & (q_tile < tl.cdiv(q_len, BLOCK_Q)):
            _attend_q_tile(q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, k_tail, v_tail, block_tables_ptr, out_ptr,
                           slopes_ptr, sinks_ptr,
                           qk_scale, softcap_in, softcap_out2, window, v_scale, stride_qt, stride_qh, stride_ot,
                           stride_oh, stride_bt, stride_cb, stride_cs, stride_ch, stride_kt, stride_kh, stride_vt,
                           stride_vh, seq, q_start, q_len, seq_len, q_tile, head0, kv_head,
                           ROW_HEADS, BLOCK_M, BLOCK_Q, BLOCK_N, BLOCK_N_PAGED, HEAD_DIM, HEAD_DIM_PAD, D_MASKED,
                           BLOCK_SIZE, NEW_KV, BLOCKWISE, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, USE_SINKS,
                           DOT_PRECISION, KV_FP8, LAZY_RESCALE, HAS_PREFIX, Q_SCALED, LOOP_STAGES, LOOP_UNROLL,
                           LOOP_WS, OVERLAP_QK, BLOCK_N_TAIL, ONE_LOOP)
    else:
        _searched_item(tile, head0, kv_head, q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, k_tail, v_tail,
                       block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr, slopes_ptr, sinks_ptr, qk_scale,
                       softcap_in, softcap_out2, window, v_scale, stride_qt, stride_qh, stride_ot, stride_oh,
                       stride_bt, stride_cb, stride_cs, stride_ch, stride_kt, stride_kh, stride_vt, stride_vh,
                       num_seqs, ROW_HEADS, BLOCK_M, BLOCK_Q, BLOCK_N, BLOCK_N_PAGED, HEAD_DIM, HEAD_DIM_PAD,
                       D_MASKED, BLOCK_SIZE, NEW_KV, BLOCKWISE, REVERSE, PAIR_TILES, SEQ_VEC, USE_SOFTCAP, USE_ALIBI,
                       USE_WINDOW, USE_SINKS, DOT_PRECISION, KV_FP8, LAZY_RESCALE, HAS_PREFIX, Q_SCALED, LOOP_STAGES,
                       LOOP_UNROLL, LOOP_WS, OVERLAP_QK, SKIP_SINGLE, BLOCK_N_TAIL, ONE_LOOP)


@triton.jit
def _searched_item(tile, head0, kv_head, q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, k_tail, v_tail,
                   block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr, slopes_ptr, sinks_ptr, qk_scale,
                   softcap_in, softcap_out2, window, v_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                   stride_cb, stride_cs, stride_ch, stride_kt, stride_kh, stride_vt, stride_vh, num_seqs,
                   ROW_HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_N_PAGED: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   D_MASKED: tl.constexpr, BLOCK_SIZE: tl.constexpr, NEW_KV: tl.constexpr, BLOCKWISE: tl.constexpr,
                   REVERSE: tl.constexpr, PAIR_TILES: tl.constexpr, SEQ_VEC: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                   USE_ALIBI: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, LAZY_RESCALE: tl.constexpr,
                   HAS_PREFIX: tl.constexpr, Q_SCALED: tl.constexpr, LOOP_STAGES: tl.constexpr,
                   LOOP_UNROLL: tl.constexpr, LOOP_WS: tl.constexpr, OVERLAP_QK: tl.constexpr,
                   SKIP_SINGLE: tl.constexpr, BLOCK_N_TAIL: tl.constexpr, ONE_LOOP: tl.constexpr):
    """The plain grid's mapping: tile slots query_start_loc[i] // BLOCK_Q + i of sequence i, found by search."""
    # With PAIR_TILES a program takes two query tiles of its sequence, so the grid counts pairs.
    seq, q_start, q_len, seq_len = _find_seq(query_start_loc_ptr, seq_lens_ptr, tile, num_seqs,
                                             BLOCK_Q * (1 + PAIR_TILES), SEQ_VEC)
    slot = tile - (q_start // (BLOCK_Q * (1 + PAIR_TILES)) + seq)
    n_q_tiles = tl.cdiv(q_len, BLOCK_Q)
    if SKIP_SINGLE:
        run = q_len != 1
    else:
        run = q_len >= 0
    if PAIR_TILES:
        # Tiles n - 1 - slot (the most keys) and slot (the fewest): every program gets about the same work.
        if run & (2 * slot < n_q_tiles):
            _attend_q_tile(q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, k_tail, v_tail, block_tables_ptr, out_ptr,
                           slopes_ptr, sinks_ptr,
                           qk_scale, softcap_in, softcap_out2, window, v_scale, stride_qt, stride_qh, stride_ot,
                           stride_oh, stride_bt, stride_cb, stride_cs, stride_ch, stride_kt, stride_kh, stride_vt,
                           stride_vh, seq, q_start, q_len, seq_len, n_q_tiles - 1 - slot, head0, kv_head,
                           ROW_HEADS, BLOCK_M, BLOCK_Q, BLOCK_N, BLOCK_N_PAGED, HEAD_DIM, HEAD_DIM_PAD, D_MASKED,
                           BLOCK_SIZE, NEW_KV, BLOCKWISE, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, USE_SINKS,
                           DOT_PRECISION, KV_FP8, LAZY_RESCALE, HAS_PREFIX, Q_SCALED, LOOP_STAGES, LOOP_UNROLL,
                           LOOP_WS, OVERLAP_QK, BLOCK_N_TAIL, ONE_LOOP)
            if 2 * slot + 1 < n_q_tiles:
                _attend_q_tile(q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, k_tail, v_tail, block_tables_ptr,
                               out_ptr, slopes_ptr, sinks_ptr, qk_scale, softcap_in, softcap_out2, window, v_scale,
                               stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_cs, stride_ch,
                               stride_kt, stride_kh, stride_vt, stride_vh, seq, q_start, q_len, seq_len, slot, head0,
                               kv_head, ROW_HEADS, BLOCK_M, BLOCK_Q, BLOCK_N, BLOCK_N_PAGED, HEAD_DIM, HEAD_DIM_PAD,
                               D_MASKED, BLOCK_SIZE, NEW_KV, BLOCKWISE, USE_SOFTCAP, USE_ALIBI, USE_WINDOW,
                               USE_SINKS, DOT_PRECISION, KV_FP8, LAZY_RESCALE, HAS_PREFIX, Q_SCALED, LOOP_STAGES,
                               LOOP_UNROLL, LOOP_WS, OVERLAP_QK, BLOCK_N_TAIL, ONE_LOOP)
    else:
        if run & (slot < n_q_tiles):
            if REVERSE:
                q_tile = n_q_tiles - 1 - slot
            else:
                q_tile = slot
            _attend_q_tile(q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, k_tail, v_tail, block_tables_ptr, out_ptr,
                           slopes_ptr, sinks_ptr,
                           qk_scale, softcap_in, softcap_out2, window, v_scale, stride_qt, stride_qh, stride_ot,
                           stride_oh, stride_bt, stride_cb, stride_cs, stride_ch, stride_kt, stride_kh, stride_vt,
                           stride_vh, seq, q_start, q_len, seq_len, q_tile, head0, kv_head,
                           ROW_HEADS, BLOCK_M, BLOCK_Q, BLOCK_N, BLOCK_N_PAGED, HEAD_DIM, HEAD_DIM_PAD, D_MASKED,
                           BLOCK_SIZE, NEW_KV, BLOCKWISE, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, USE_SINKS,
                           DOT_PRECISION, KV_FP8, LAZY_RESCALE, HAS_PREFIX, Q_SCALED, LOOP_STAGES, LOOP_UNROLL,
                           LOOP_WS, OVERLAP_QK, BLOCK_N_TAIL, ONE_LOOP)


@triton.jit
def _listed_item(tile, head_group, chunks_ptr, stride_chunks, n_chunks, q_ptr, k_cache_ptr, v_cache_ptr, k_new,
                 v_new, k_tail, v_tail, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr, slopes_ptr,
                 sinks_ptr, qk_scale, softcap_in, softcap_out2, window, v_scale, stride_qt, stride_qh, stride_ot,
                 stride_oh, stride_bt, stride_cb, stride_cs, stride_ch, stride_kt, stride_kh, stride_vt, stride_vh,
                 QUERIES_PER_KV: tl.constexpr, ROW_HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_N_PAGED: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HEAD_DIM_PAD: tl.constexpr, D_MASKED: tl.constexpr, BLOCK_SIZE: tl.constexpr, NEW_KV: tl.constexpr,
                 BLOCKWISE: tl.constexpr, REVERSE: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr,
                 USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 KV_FP8: tl.constexpr, LAZY_RESCALE: tl.constexpr, HAS_PREFIX: tl.constexpr, Q_SCALED: tl.constexpr,
                 LOOP_STAGES: tl.constexpr, LOOP_UNROLL: tl.constexpr, LOOP_WS: tl.constexpr,
                 OVERLAP_QK: tl.constexpr, BLOCK_N_TAIL: tl.constexpr, ONE_LOOP: tl.constexpr):
    """CHUNK_LIST's mapping: tile slots cq[j] // BLOCK_Q + j of listed chunk j (cq: the listed chunks' query counts'
    prefix sums, chunks_ptr row 0; their sequences in row 1 after the count), found by search over the listed
    chunks alone; spare slots of a chunk do nothing."""
    head0 = head_group * ROW_HEADS
    kv_head = head0 // QUERIES_PER_KV
    lo = 0
    hi = n_chunks
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(chunks_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    j = lo - 1
    cq0 = tl.load(chunks_ptr + j)
    q_len = tl.load(chunks_ptr + j + 1) - cq0
    seq = tl.load(chunks_ptr + stride_chunks + 1 + j)
    q_start = tl.load(query_start_loc_ptr + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    slot = tile - (cq0 // BLOCK_Q + j)
    n_q_tiles = tl.cdiv(q_len, BLOCK_Q)
    if slot < n_q_tiles:
        if REVERSE:
            q_tile = n_q_tiles - 1 - slot
        else:
            q_tile = slot
        _attend_q_tile(q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, k_tail, v_tail, block_tables_ptr, out_ptr,
                       slopes_ptr, sinks_ptr,
                       qk_scale, softcap_in, softcap_out2, window, v_scale, stride_qt, stride_qh, stride_ot,
                       stride_oh, stride_bt, stride_cb, stride_cs, stride_ch, stride_kt, stride_kh, stride_vt,
                       stride_vh, seq, q_start, q_len, seq_len, q_tile, head0, kv_head,
                       ROW_HEADS, BLOCK_M, BLOCK_Q, BLOCK_N, BLOCK_N_PAGED, HEAD_DIM, HEAD_DIM_PAD, D_MASKED,
                       BLOCK_SIZE, NEW_KV, BLOCKWISE, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, USE_SINKS,
                       DOT_PRECISION, KV_FP8, LAZY_RESCALE, HAS_PREFIX, Q_SCALED, LOOP_STAGES, LOOP_UNROLL,
                       LOOP_WS, OVERLAP_QK, BLOCK_N_TAIL, ONE_LOOP)


# num_seqs changes every step: specializing on it (== 1, % 16 == 0) would recompile mid-serving.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt", "window", "num_tiles", "max_q_tiles", "stride_chunks"])
def _paged_prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]: the step's new tokens, sequence after sequence
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]  (kv_cache[0])
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]  (kv_cache[1])
    k_new,  # NEW_KV_PTR: [num_tokens, num_kv_heads, head_dim] this step's keys; NEW_KV_TMA: a descriptor
    v_new,  # over them as [num_tokens, num_kv_heads * head_dim]; NEW_KV_PAGED: unused
    k_tail,  # k_new / v_new again, or with BLOCK_N_TAIL < BLOCK_N and TMA descriptors of BLOCK_N_TAIL-row boxes
    v_tail,
    block_tables_ptr,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens_ptr,  # int32 [num_seqs]: context length including the new tokens
    query_start_loc_ptr,  # int32 [num_seqs + 1]
    out_ptr,  # [num_tokens, num_heads, head_dim]
    slopes_ptr,  # fp32 [num_heads]: ALiBi slopes (read if USE_ALIBI)
    sinks_ptr,  # fp32 [num_heads]: sink logits (read if USE_SINKS)
    qk_scale,  # softmax scale * log2(e)
    softcap_in,  # scale / softcap
    softcap_out2,  # softcap * log2(e)
    window,  # sliding window (keys p - window + 1 ... p), if USE_WINDOW
    v_scale,  # an fp8 cache's value scale (read if KV_FP8)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    num_seqs,
    num_tiles,  # the plain grid's first axis: tile slots (see the module docstring)
    max_q_tiles,  # HEAVY_FIRST: query tiles of the longest chunk (num_tiles = num_seqs * max_q_tiles)
    chunks_ptr,  # CHUNK_LIST: int32 [2, stride_chunks] (paged_prefill's chunk_list); else unused
    stride_chunks,
    QUERIES_PER_KV: tl.constexpr,
    ROW_HEADS: tl.constexpr,  # query heads per program: QUERIES_PER_KV (PACK_GQA) or 1
    BLOCK_M: tl.constexpr,  # rows: BLOCK_Q tokens x ROW_HEADS heads (rest padding)
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_N_PAGED: tl.constexpr,  # the cached prefix's tile when the chunk's keys come from k/v (NEW_KV)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # next power of two (>= 16); the extra columns are masked
    D_MASKED: tl.constexpr,  # HEAD_DIM != HEAD_DIM_PAD
    BLOCK_SIZE: tl.constexpr,
    NEW_KV: tl.constexpr,  # NEW_KV_PAGED / NEW_KV_PTR / NEW_KV_TMA: where the chunk's own keys come from
    BLOCKWISE: tl.constexpr,  # one block-table lookup per block (BLOCK_N % BLOCK_SIZE == 0)
    REVERSE: tl.constexpr,  # a sequence's last query tiles (the most keys) get the lowest program ids
    PAIR_TILES: tl.constexpr,  # a program takes a sequence's tiles n - 1 - i and i (equal work per program)
    SEQ_VEC: tl.constexpr,  # > num_seqs: a program finds its sequence with vector loads; 0: binary search
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,  # the cache is float8 e4m3 (k_scale already folded into qk_scale by the host)
    LAZY_RESCALE: tl.constexpr,  # rescale acc only when a row's max grew by more than 2^8
    HAS_PREFIX: tl.constexpr,  # some sequence has cached keys before its chunk (the host knows; else fresh prompts)
    Q_SCALED: tl.constexpr,  # fold the softmax scale into q once (not with soft-cap or ALiBi)
    LOOP_STAGES: tl.constexpr,  # > 0: tl.range(num_stages=) on the unmasked key loop
    LOOP_UNROLL: tl.constexpr,  # > 1: tl.range(loop_unroll_factor=) on it
    LOOP_WS: tl.constexpr,  # tl.range(warp_specialize=True) on it
    OVERLAP_QK: tl.constexpr,  # the chunk's TMA loop issues the next tile's QK^T before this tile's softmax
    SKIP_SINGLE: tl.constexpr,  # sequences with one new token are left to the decode kernel (mixed steps)
    BLOCK_N_TAIL: tl.constexpr,  # < BLOCK_N: the chunk's diagonal (keys some row does not see) in narrower tiles
    ONE_LOOP: tl.constexpr,  # 0: free tiles and masked tiles in separate loops; 1/2: one loop (see _attend_span)
    PERSISTENT: tl.constexpr,  # > 0: the grid is PERSISTENT programs per SM looping over the work items
    NUM_HEAD_GROUPS: tl.constexpr,  # num_heads // ROW_HEADS: the plain grid's second axis
    HEAVY_FIRST: tl.constexpr,  # tile slots r * num_seqs + seq: every sequence's heaviest chunk tiles first
    CHUNK_LIST: tl.constexpr = False,  # (with PERSISTENT) walk the listed chunks' tiles only (chunks_ptr)
):
    if CHUNK_LIST:
        # The tile count is the device's to know (the list changes per step under one CUDA graph): the grid is
        # fixed and its programs walk (tile, head group) items up to the listed chunks' last slot.
        n_chunks = tl.load(chunks_ptr + stride_chunks)
        total = tl.load(chunks_ptr + n_chunks) // BLOCK_Q + n_chunks
        for w in range(tl.program_id(0), total * NUM_HEAD_GROUPS, tl.num_programs(0)):
            _listed_item(w % total, w // total, chunks_ptr, stride_chunks, n_chunks, q_ptr, k_cache_ptr, v_cache_ptr,
                         k_new, v_new, k_tail, v_tail, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr,
                         slopes_ptr, sinks_ptr, qk_scale, softcap_in, softcap_out2, window, v_scale, stride_qt,
                         stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_cs, stride_ch, stride_kt,
                         stride_kh, stride_vt, stride_vh, QUERIES_PER_KV, ROW_HEADS, BLOCK_M, BLOCK_Q, BLOCK_N,
                         BLOCK_N_PAGED, HEAD_DIM, HEAD_DIM_PAD, D_MASKED, BLOCK_SIZE, NEW_KV, BLOCKWISE, REVERSE,
                         USE_SOFTCAP, USE_ALIBI, USE_WINDOW, USE_SINKS, DOT_PRECISION, KV_FP8, LAZY_RESCALE,
                         HAS_PREFIX, Q_SCALED, LOOP_STAGES, LOOP_UNROLL, LOOP_WS, OVERLAP_QK, BLOCK_N_TAIL, ONE_LOOP)
    elif PERSISTENT > 0:
        # A fixed grid (PERSISTENT programs per SM) walks the work items in the launch order of the plain
        # grid (tile slots fastest, then head groups), so no program waits on the block scheduler.
        for w in range(tl.program_id(0), num_tiles * NUM_HEAD_GROUPS, tl.num_programs(0)):
            _work_item(w % num_tiles, w // num_tiles, q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, k_tail, v_tail, block_tables_ptr, seq_lens_ptr,
               query_start_loc_ptr, out_ptr, slopes_ptr, sinks_ptr, qk_scale, softcap_in, softcap_out2, window,
               v_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_cs, stride_ch,
               stride_kt, stride_kh, stride_vt, stride_vh, num_seqs, max_q_tiles,
                       QUERIES_PER_KV, ROW_HEADS, BLOCK_M, BLOCK_Q, BLOCK_N, BLOCK_N_PAGED, HEAD_DIM, HEAD_DIM_PAD, D_MASKED, BLOCK_SIZE, NEW_KV, BLOCKWISE, REVERSE, PAIR_TILES, SEQ_VEC, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, USE_SINKS, DOT_PRECISION, KV_FP8, LAZY_RESCALE, HAS_PREFIX, Q_SCALED, LOOP_STAGES, LOOP_UNROLL, LOOP_WS, OVERLAP_QK, SKIP_SINGLE, BLOCK_N_TAIL, ONE_LOOP, HEAVY_FIRST)
    else:
        _work_item(tl.program_id(0), tl.program_id(1), q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, k_tail, v_tail, block_tables_ptr, seq_lens_ptr,
               query_start_loc_ptr, out_ptr, slopes_ptr, sinks_ptr, qk_scale, softcap_in, softcap_out2, window,
               v_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_cs, stride_ch,
               stride_kt, stride_kh, stride_vt, stride_vh, num_seqs, max_q_tiles,
                   QUERIES_PER_KV, ROW_HEADS, BLOCK_M, BLOCK_Q, BLOCK_N, BLOCK_N_PAGED, HEAD_DIM, HEAD_DIM_PAD, D_MASKED, BLOCK_SIZE, NEW_KV, BLOCKWISE, REVERSE, PAIR_TILES, SEQ_VEC, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, USE_SINKS, DOT_PRECISION, KV_FP8, LAZY_RESCALE, HAS_PREFIX, Q_SCALED, LOOP_STAGES, LOOP_UNROLL, LOOP_WS, OVERLAP_QK, SKIP_SINGLE, BLOCK_N_TAIL, ONE_LOOP, HEAVY_FIRST)


def _new_kv_mode(mode: str, k: torch.Tensor | None, v: torch.Tensor | None, q: torch.Tensor,
                 kv_cache: torch.Tensor) -> int:
    """The NEW_KV constexpr for the requested mode: the block table when no k/v are given or the cache
    is fp8; "tma" falls back to plain loads where a descriptor cannot describe k/v."""
    if mode not in NEW_KV_MODES:
        raise ValueError(f"NEW_KV must be one of {sorted(NEW_KV_MODES)}; got {mode!r}")
    if k is None or v is None or mode == "paged" or kv_cache.dtype == torch.float8_e4m3fn:
        return NEW_KV_PAGED
    if mode == "tma":
        head_dim = q.shape[2]
        row_bytes_ok = all(t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0 for t in (k, v))
        if head_dim == head_dim_pad(head_dim) and all(t.stride(1) == head_dim for t in (k, v)) and row_bytes_ok:
            return NEW_KV_TMA
    return NEW_KV_PTR


def _check_new_kv(k: torch.Tensor | None, v: torch.Tensor | None, q: torch.Tensor, kv_cache: torch.Tensor) -> None:
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is None:
        return
    want = (q.shape[0], kv_cache.shape[3], q.shape[2])
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != want or t.dtype != q.dtype or t.stride(2) != 1:
            raise ValueError(f"{name} must be {q.dtype} [num_tokens, num_kv_heads, head_dim] = {list(want)} and "
                             f"contiguous in head_dim; got {t.dtype} {tuple(t.shape)} strides {t.stride()}")


def paged_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    has_prefix: bool = True,
    skip_single: bool = False,
    max_query_len: int | None = None,
    chunk_list: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each new token over its sequence's cached tokens up to itself.

    q [num_tokens, num_heads, head_dim] (sequence i owns rows query_start_loc[i]:query_start_loc[i+1]);
    kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim] already holding these tokens' K/V;
    block_tables int32 [num_seqs, max_blocks]; seq_lens int32 [num_seqs]; query_start_loc int32
    [num_seqs + 1]. Rows after query_start_loc[-1] (padding) are left unwritten.
    sliding_window, logit_softcap, alibi_slopes, sinks: as in AttentionParams (docs/attention-seam.md);
    with a window, block-table entries of blocks wholly before the window of the sequence's first new
    token are never read.
    k_scale, v_scale: a float8_e4m3fn cache holds k / k_scale and v / v_scale (unused for other caches).
    k, v: optionally this step's new K/V [num_tokens, num_kv_heads, head_dim] in q's dtype (what
    reshape_and_cache wrote; rows may be strided, e.g. views of a fused qkv, and must be finite); with
    them the chunk's own keys are read contiguously (config NEW_KV), the cached prefix through the table.
    has_prefix=False promises that every sequence is a fresh prompt (seq_len == its query count), so with
    k/v the kernel is compiled without its block-table path; it is ignored without k/v.
    skip_single: leave the rows of sequences with exactly one new token unwritten (a mixed step's decode
    rows, which paged_decode(query_start_loc=...) attends to at the decode kernel's rate).
    chunk_list: with skip_single, the sequences with more than one new token as make_chunk_list writes them (int32
    [2, >= num_seqs + 1]); with a config whose CHUNK_LIST is set the launch walks their tiles alone on a persistent
    grid (PERSISTENT programs per SM, 2 if unset), not a tile slot per sequence: a mixed step's decode rows then
    cost no programs. Under a CUDA graph the list is refreshed per replay like query_start_loc.
    max_query_len: the longest sequence's query count (or any bound at least that), if the host knows it (else
    num_tokens bounds it); with has_prefix, head_dim, the group and the dtype it picks the config
    (kernels/paged_prefill_configs.py), and HEAVY_FIRST sizes its grid by it.
    config: BLOCK_M, BLOCK_N, BLOCK_N_PAGED, num_warps, num_stages, NEW_KV ("paged" / "ptr" / "tma"), PACK_GQA,
    BLOCKWISE, REVERSE, PAIR_TILES, LAZY_RESCALE, SEQ_VEC, Q_SCALED, LOOP_STAGES, LOOP_UNROLL, LOOP_WS,
    OVERLAP_QK, BLOCK_N_TAIL, ONE_LOOP, PERSISTENT, HEAVY_FIRST (see the kernel), maxnreg (optional); GLUON (and PV_ASYNC,
    GLUON_WS, WS_REGS, PINGPONG, Q_BUFS, DYNAMIC, AHEAD, TMA_STORE): launches kernels/paged_prefill_gluon.py supports
    (fresh prompts, k/v, 16-bit, no variants, sm_90) take a Gluon kernel with BLOCK_M, BLOCK_N, num_warps, num_stages, SEQ_VEC, maxnreg, the rest the Triton
    kernel; unset keys take the selected config's.
    Returns out [num_tokens, num_heads, head_dim] in q's dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = query_start_loc.shape[0] - 1
    check_paged_inputs(q, kv_cache, block_tables, seq_lens, num_seqs, "num_tokens")
    check_query_start_loc(query_start_loc)
    _check_new_kv(k, v, q, kv_cache)
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if fp8:
        check_kv_scales(k_scale, v_scale)
        scale = scale * k_scale  # q . (k / k_scale) * (scale * k_scale) = scale * q . k
    variants = kernel_variants(scale, num_heads, q.device, sliding_window, logit_softcap, alibi_slopes, sinks)
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0 or num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    if max_query_len is not None and max_query_len < 0:
        raise ValueError(f"max_query_len must be >= 0; got {max_query_len}")
    longest = num_tokens if max_query_len is None else max_query_len
    use_table = k is not None and not fp8  # the table was measured with the chunk's keys read from k/v
    cfg = dict(select_config(head_dim, group, q.dtype, has_prefix, longest, use_table), **(config or {}))
    has_variants = any(x is not None for x in (sliding_window, logit_softcap, alibi_slopes, sinks))
    if (cfg.get("GLUON") and paged_prefill_gluon is not None and cfg["BLOCK_M"] % group == 0
            and paged_prefill_gluon.supported(q, k, v, group, fp8, has_variants, has_prefix)):
        return paged_prefill_gluon.prefill_fresh(q, k, v, query_start_loc, scale, out, cfg, skip_single,
                                                 max_query_len)
    if cfg.get("GLUON") and cfg.get("TRITON"):
        # A table entry naming the Gluon kernel also names the Triton config for the launches that kernel does not
        # serve (another GPU, soft-cap / ALiBi / window / sinks, strides TMA cannot take).
        cfg = dict(BASE, **cfg["TRITON"])
    row_heads = group if cfg["PACK_GQA"] else 1
    block_m = max(cfg["BLOCK_M"], 16, triton.next_power_of_2(row_heads))
    block_q = block_m // row_heads
    block_n = cfg["BLOCK_N"]
    new_kv = _new_kv_mode(cfg["NEW_KV"], k, v, q, kv_cache)
    if new_kv == NEW_KV_TMA:
        k_new, v_new = (TensorDescriptor(t, [num_tokens, num_kv_heads * head_dim], [t.stride(0), 1],
                                         [block_n, head_dim]) for t in (k, v))
    elif new_kv == NEW_KV_PTR:
        k_new, v_new = k, v
    else:
        k_new = v_new = q  # unread
    block_n_paged = (cfg.get("BLOCK_N_PAGED") or block_n) if new_kv != NEW_KV_PAGED else block_n
    block_n_tail = min(cfg.get("BLOCK_N_TAIL") or block_n, block_n) if new_kv != NEW_KV_PAGED else block_n
    if block_n % block_n_tail:
        raise ValueError(f"BLOCK_N_TAIL must divide BLOCK_N ({block_n}); got {block_n_tail}")
    if block_n_tail < block_n and new_kv == NEW_KV_TMA:
        k_tail, v_tail = (TensorDescriptor(t, [num_tokens, num_kv_heads * head_dim], [t.stride(0), 1],
                                           [block_n_tail, head_dim]) for t in (k, v))
    else:
        k_tail, v_tail = k_new, v_new
    k_strides = k.stride()[:2] if k is not None else (0, 0)
    v_strides = v.stride()[:2] if v is not None else (0, 0)
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    tiles_per_program = 2 if cfg["PAIR_TILES"] else 1
    num_tiles = num_tokens // (block_q * tiles_per_program) + num_seqs
    max_q_tiles = heavy_first_tiles(cfg, max_query_len, num_seqs, block_q, num_tiles)
    heavy_first = max_q_tiles > 0
    if heavy_first:
        num_tiles = num_seqs * max_q_tiles
    persistent = int(cfg.get("PERSISTENT") or 0)
    if chunk_list is not None and (chunk_list.dtype != torch.int32 or chunk_list.dim() != 2
                                   or chunk_list.shape[0] != 2 or chunk_list.shape[1] < num_seqs + 1
                                   or chunk_list.stride(1) != 1 or chunk_list.device != q.device):
        raise ValueError(f"chunk_list must be int32 [2, >= num_seqs + 1 = {num_seqs + 1}] with contiguous rows on "
                         f"{q.device}; got {chunk_list.dtype} {list(chunk_list.shape)} on {chunk_list.device}")
    listed = (chunk_list is not None and skip_single and bool(cfg.get("CHUNK_LIST")) and not cfg["PAIR_TILES"]
              and not heavy_first)
    if listed:
        persistent = persistent or 2
        grid = (persistent * sm_count(q.device),)
    elif persistent:
        grid = (min(num_tiles * (num_heads // row_heads), persistent * sm_count(q.device)),)
    else:
        grid = (num_tiles, num_heads // row_heads)
    _paged_prefill_kernel[grid](
        q, key_cache, value_cache, k_new, v_new, k_tail, v_tail, block_tables, seq_lens, query_start_loc, out,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_bt=block_tables.stride(0),
        stride_cb=key_cache.stride(0), stride_cs=key_cache.stride(1), stride_ch=key_cache.stride(2),
        stride_kt=k_strides[0], stride_kh=k_strides[1], stride_vt=v_strides[0], stride_vh=v_strides[1],
        num_seqs=num_seqs,
        num_tiles=num_tiles,
        max_q_tiles=max_q_tiles,
        chunks_ptr=chunk_list if listed else query_start_loc,
        stride_chunks=chunk_list.stride(0) if listed else 0,
        QUERIES_PER_KV=group,
        ROW_HEADS=row_heads,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        BLOCK_N_PAGED=block_n_paged,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad(head_dim),
        D_MASKED=head_dim != head_dim_pad(head_dim),
        BLOCK_SIZE=block_size,
        NEW_KV=new_kv,
        BLOCKWISE=bool(cfg["BLOCKWISE"]) and block_n_paged % block_size == 0,
        REVERSE=bool(cfg["REVERSE"]),
        PAIR_TILES=int(bool(cfg["PAIR_TILES"])),
        SKIP_SINGLE=bool(skip_single),
        LAZY_RESCALE=bool(cfg["LAZY_RESCALE"]),
        HAS_PREFIX=bool(has_prefix) or new_kv == NEW_KV_PAGED,
        Q_SCALED=bool(cfg.get("Q_SCALED")),
        LOOP_STAGES=int(cfg.get("LOOP_STAGES") or 0),
        LOOP_UNROLL=int(cfg.get("LOOP_UNROLL") or 0),
        LOOP_WS=bool(cfg.get("LOOP_WS")),
        OVERLAP_QK=bool(cfg.get("OVERLAP_QK")),
        BLOCK_N_TAIL=block_n_tail,
        ONE_LOOP=int(cfg.get("ONE_LOOP") or 0),
        PERSISTENT=persistent,
        NUM_HEAD_GROUPS=num_heads // row_heads,
        HEAVY_FIRST=heavy_first,
        CHUNK_LIST=listed,
        # two compiled versions at most; HEAVY_FIRST reads no search, so one
        SEQ_VEC=cfg["SEQ_VEC"] if num_seqs < cfg["SEQ_VEC"] and not heavy_first else 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        KV_FP8=fp8,
        v_scale=v_scale,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}),  # a register cap: 2 programs per SM
        **variants.launch_args(seq_lens),
    )
    return out


def make_chunk_list(query_lens, out=None):
    """paged_prefill's chunk_list from a step's per-sequence new-token counts (a numpy int array or a list): int32
    [2, num_seqs + 1], row 0 the prefix sums of the counts of sequences with more than one new token (then the
    total repeated), row 1 their number, then their indices. `out`: a numpy int32 array of at least that shape
    to fill (pinned staging); returned trimmed to num_seqs + 1 columns."""
    q = np.asarray(query_lens, dtype=np.int64)
    n = q.shape[0]
    idx = np.flatnonzero(q > 1)
    buf = np.zeros((2, n + 1), dtype=np.int32) if out is None else out[:, :n + 1]
    buf[0, 0] = 0
    np.cumsum(q[idx], out=buf[0, 1:len(idx) + 1])
    buf[0, len(idx) + 1:] = buf[0, len(idx)]
    buf[1, 0] = len(idx)
    buf[1, 1:len(idx) + 1] = idx
    buf[1, len(idx) + 1:] = 0
    return buf


def paged_prefill_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                      k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Torch reference of paged_prefill (float32 math, output in q's dtype; padding rows are zero; an fp8
    cache dequantized first)."""
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if not fp8:
        k_scale = v_scale = 1.0
    pool = kv_cache.view(torch.uint8) if fp8 else kv_cache  # gather bytes: float8 indexing is missing on some devices
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.zeros_like(q)
    for i in range(query_start_loc.shape[0] - 1):
        start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
        n, q_len = int(seq_lens[i]), end - start
        blocks = block_tables[i, : (n + block_size - 1) // block_size].long()
        k = pool[0, blocks].reshape(-1, num_kv_heads, head_dim)[:n].view(kv_cache.dtype).float() * k_scale
        v = pool[1, blocks].reshape(-1, num_kv_heads, head_dim)[:n].view(kv_cache.dtype).float() * v_scale
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        s = torch.einsum("qhd,nhd->hqn", q[start:end].float(), k) * scale
        q_pos = torch.arange(n - q_len, n, device=q.device)
        s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > q_pos[:, None], float("-inf"))
        out[start:end] = torch.einsum("hqn,nhd->qhd", s.softmax(-1), v).to(q.dtype)
    return out
