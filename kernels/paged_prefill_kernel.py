"""The @triton.jit kernel of kernels/paged_prefill.py: its grid mapping (plain, persistent, HEAVY_FIRST, CHUNK_LIST)
and one query tile's attention (_attend_q_tile), which walks the key sources with kernels/paged_prefill_span.py.

The overview (tiles, key sources, the program-to-sequence mapping) is kernels/paged_prefill.py's docstring; the host
wrapper that checks inputs, picks the config and launches _paged_prefill_kernel is paged_prefill() there.
"""

import triton
import triton.language as tl

from kernels.paged_common import load_tile
from kernels.paged_prefill_span import _attend_span


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
def _work_item(tile, head_group, q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, k_tail, v_tail, block_tables_ptr,
               seq_lens_ptr, query_start_loc_ptr, out_ptr, slopes_ptr, sinks_ptr, qk_scale, softcap_in, softcap_out2,
               window, v_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_cs,
               stride_ch, stride_kt, stride_kh, stride_vt, stride_vh, num_seqs, max_q_tiles,
               QUERIES_PER_KV: tl.constexpr, ROW_HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_N_PAGED: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               D_MASKED: tl.constexpr, BLOCK_SIZE: tl.constexpr, NEW_KV: tl.constexpr, BLOCKWISE: tl.constexpr,
               REVERSE: tl.constexpr, PAIR_TILES: tl.constexpr, SEQ_VEC: tl.constexpr, USE_SOFTCAP: tl.constexpr,
               USE_ALIBI: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr,
               DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, LAZY_RESCALE: tl.constexpr,
               HAS_PREFIX: tl.constexpr, Q_SCALED: tl.constexpr, LOOP_STAGES: tl.constexpr, LOOP_UNROLL: tl.constexpr,
               LOOP_WS: tl.constexpr, OVERLAP_QK: tl.constexpr, SKIP_SINGLE: tl.constexpr, BLOCK_N_TAIL: tl.constexpr,
               ONE_LOOP: tl.constexpr, HEAVY_FIRST: tl.constexpr):
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
            _work_item(w % num_tiles, w // num_tiles, q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, k_tail, v_tail,
                       block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr, slopes_ptr, sinks_ptr, qk_scale,
                       softcap_in, softcap_out2, window, v_scale, stride_qt, stride_qh, stride_ot, stride_oh,
                       stride_bt, stride_cb, stride_cs, stride_ch, stride_kt, stride_kh, stride_vt, stride_vh,
                       num_seqs, max_q_tiles, QUERIES_PER_KV, ROW_HEADS, BLOCK_M, BLOCK_Q, BLOCK_N, BLOCK_N_PAGED,
                       HEAD_DIM, HEAD_DIM_PAD, D_MASKED, BLOCK_SIZE, NEW_KV, BLOCKWISE, REVERSE, PAIR_TILES, SEQ_VEC,
                       USE_SOFTCAP, USE_ALIBI, USE_WINDOW, USE_SINKS, DOT_PRECISION, KV_FP8, LAZY_RESCALE, HAS_PREFIX,
                       Q_SCALED, LOOP_STAGES, LOOP_UNROLL, LOOP_WS, OVERLAP_QK, SKIP_SINGLE, BLOCK_N_TAIL, ONE_LOOP,
                       HEAVY_FIRST)
    else:
        _work_item(tl.program_id(0), tl.program_id(1), q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, k_tail, v_tail,
                   block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr, slopes_ptr, sinks_ptr, qk_scale,
                   softcap_in, softcap_out2, window, v_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                   stride_cb, stride_cs, stride_ch, stride_kt, stride_kh, stride_vt, stride_vh, num_seqs, max_q_tiles,
                   QUERIES_PER_KV, ROW_HEADS, BLOCK_M, BLOCK_Q, BLOCK_N, BLOCK_N_PAGED, HEAD_DIM, HEAD_DIM_PAD,
                   D_MASKED, BLOCK_SIZE, NEW_KV, BLOCKWISE, REVERSE, PAIR_TILES, SEQ_VEC, USE_SOFTCAP, USE_ALIBI,
                   USE_WINDOW, USE_SINKS, DOT_PRECISION, KV_FP8, LAZY_RESCALE, HAS_PREFIX, Q_SCALED, LOOP_STAGES,
                   LOOP_UNROLL, LOOP_WS, OVERLAP_QK, SKIP_SINGLE, BLOCK_N_TAIL, ONE_LOOP, HEAVY_FIRST)
