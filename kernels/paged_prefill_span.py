"""The key loop of kernels/paged_prefill.py's kernel: one source's keys in BLOCK_N tiles through the online softmax.

_attend_span walks keys [a, b) of one source (the cache through the block table, or the step's contiguous k/v by
pointer or TMA descriptor), the tiles every row sees unmasked and the edges masked; _tile loads one tile (_load_kv)
and folds it in (_online_softmax: _scores, then _fold). The kernel and its grid mapping are in
kernels/paged_prefill_kernel.py; the overview is kernels/paged_prefill.py's docstring.
"""

import triton
import triton.language as tl

from kernels.paged_common import base2_scores, load_tile


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
