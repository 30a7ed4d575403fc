"""Paged prefill / extend attention: a variable-length chunk of new tokens per sequence, causal.

The cache already holds this step's K/V (reshape_and_cache ran first), so sequence i's chunk of
q_len new tokens sits at positions seq_len - q_len ... seq_len - 1 and attends to every cached
position up to its own. One launch serves a whole step: prefill chunks, prefix-cache extends and
decodes (q_len 1) together.

FlashAttention-2 style: a program owns BLOCK_M query rows of one KV head and streams BLOCK_N-token
K/V tiles through an online softmax with tl.dot. The rows are (token, query head) pairs: BLOCK_Q =
BLOCK_M // G tokens times the G query heads that share the KV head, so each K/V tile is read once
for its whole group and a decode token still fills G rows. Tiles wholly before the first query
position need no causal mask and take the unmasked loop; the few near the diagonal take the masked one.

Programs map to (sequence, query tile) without a host sync: sequence i's tiles start at
query_start_loc[i] // BLOCK_Q + i (an upper bound on the tiles before it), so the grid is
num_tokens // BLOCK_Q + num_seqs and each program finds its sequence by binary search; spare
programs of a sequence exit at once.

An fp8 cache (float8_e4m3fn, KV_FP8) is upcast to q's dtype as each tile is loaded; k_scale rides in the
softmax scale (the host multiplies them) and v_scale multiplies the output once at the end.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.paged_checks import check_kv_scales, check_paged_inputs
from kernels.paged_common import base2_scores, head_dim_pad, kernel_variants, load_tile


@triton.jit
def _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table, head_off, start, seq_len, key_lo,
                 q_pos, slopes2, window, qk_scale, softcap_in, softcap_out2, stride_cb, stride_cs, offs_n, offs_d,
                 d_ok, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, D_MASKED: tl.constexpr,
                 USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_WINDOW: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr):
    pos = start + offs_n
    if MASKED:
        # Keys before key_lo (before every row's window) are never loaded: their blocks may be freed.
        valid = (pos < seq_len) & (pos >= key_lo)
        block = tl.load(block_table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    else:
        valid = pos < seq_len  # unused
        block = tl.load(block_table + pos // BLOCK_SIZE).to(tl.int64)
    tok_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + head_off
    kv_off = tok_off[:, None] + offs_d[None, :]
    k = load_tile(k_cache_ptr + kv_off, valid, d_ok, MASKED, D_MASKED, "")
    v = load_tile(v_cache_ptr + kv_off, valid, d_ok, MASKED, D_MASKED, "")
    if KV_FP8:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if USE_SOFTCAP or USE_ALIBI:
        s = base2_scores(s, pos, q_pos, slopes2, qk_scale, softcap_in, softcap_out2, USE_SOFTCAP, USE_ALIBI)
        scale = 1.0
    else:
        scale = qk_scale  # raw logits; the scale rides in the exp2's FMA
    if MASKED:
        keep = (pos[None, :] <= q_pos[:, None]) & valid[None, :]
        if USE_WINDOW:
            keep &= pos[None, :] > q_pos[:, None] - window
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    if USE_WINDOW:
        # A row whose window starts after this whole tile has seen no key yet: keep it at -inf
        # without computing exp2(-inf - -inf).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new  # key 0 is in every row's first tile
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s * scale - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # accumulate in the MMA
    return acc, m_new, l_i


# num_seqs changes every step: specializing on it (== 1, % 16 == 0) would recompile mid-serving.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt", "window"])
def _paged_prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]: the step's new tokens, sequence after sequence
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]  (kv_cache[0])
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]  (kv_cache[1])
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
    num_seqs,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows: BLOCK_Q tokens x QUERIES_PER_KV heads (rest padding)
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # next power of two (>= 16); the extra columns are masked
    D_MASKED: tl.constexpr,  # HEAD_DIM != HEAD_DIM_PAD
    BLOCK_SIZE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,  # the cache is float8 e4m3 (k_scale already folded into qk_scale by the host)
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    q_idx = q_tile * BLOCK_Q + offs_m // QUERIES_PER_KV  # token within the chunk
    heads = kv_head * QUERIES_PER_KV + offs_m % QUERIES_PER_KV
    row_valid = (offs_m < BLOCK_Q * QUERIES_PER_KV) & (q_idx < q_len)
    q_pos = ctx_len + q_idx
    q_rows = (q_start + q_idx).to(tl.int64)
    q = load_tile(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                  row_valid, d_ok, True, D_MASKED, "")

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

    first_pos = ctx_len + q_tile * BLOCK_Q
    last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
    num_full = (first_pos + 1) // BLOCK_N  # tiles wholly at or before the first row: no causal mask
    num_tiles = last_pos // BLOCK_N + 1
    if USE_WINDOW:
        # Tiles wholly before the first row's window are skipped; tiles wholly inside the last row's
        # window (and before the first row) need no mask; the window's leading edge is masked.
        key_lo = tl.maximum(first_pos - window + 1, 0)
        lo_tile = key_lo // BLOCK_N
        free_lo = tl.minimum(tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N), num_full)
    else:
        key_lo = 0
        lo_tile = 0
        free_lo = 0
    for t in range(lo_tile, free_lo):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table, head_off,
                                     t * BLOCK_N, seq_len, key_lo, q_pos, slopes2, window, qk_scale, softcap_in,
                                     softcap_out2, stride_cb, stride_cs, offs_n, offs_d, d_ok, BLOCK_SIZE, True,
                                     D_MASKED, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, DOT_PRECISION, KV_FP8)
    for t in range(free_lo, num_full):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table, head_off,
                                     t * BLOCK_N, seq_len, key_lo, q_pos, slopes2, window, qk_scale, softcap_in,
                                     softcap_out2, stride_cb, stride_cs, offs_n, offs_d, d_ok, BLOCK_SIZE, False,
                                     D_MASKED, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, DOT_PRECISION, KV_FP8)
    for t in range(num_full, num_tiles):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table, head_off,
                                     t * BLOCK_N, seq_len, key_lo, q_pos, slopes2, window, qk_scale, softcap_in,
                                     softcap_out2, stride_cb, stride_cs, offs_n, offs_d, d_ok, BLOCK_SIZE, True,
                                     D_MASKED, USE_SOFTCAP, USE_ALIBI, USE_WINDOW, DOT_PRECISION, KV_FP8)

    out = acc / l_i[:, None]
    if KV_FP8:
        out = out * v_scale
    o_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    if D_MASKED:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_ok[None, :])
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _prefill_config(head_dim: int, dtype: torch.dtype, group: int) -> dict:
    if _interpreting():
        cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    elif dtype == torch.float32 or head_dim >= 256:
        cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    else:  # H100, d 128, bf16 (bench/kernels.py --sweep): M128 N32 w4 s3 330 TFLOP/s, M128 N64 w8 s3 301
        cfg = dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3)
    cfg["BLOCK_M"] = max(cfg["BLOCK_M"], 16, triton.next_power_of_2(group))
    return cfg


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
    Returns out [num_tokens, num_heads, head_dim] in q's dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = query_start_loc.shape[0] - 1
    check_paged_inputs(q, kv_cache, block_tables, seq_lens, num_seqs, "num_tokens")
    if query_start_loc.dtype != torch.int32 or query_start_loc.dim() != 1:
        raise ValueError(f"query_start_loc must be int32 [num_seqs + 1]; got {query_start_loc.dtype} "
                         f"{tuple(query_start_loc.shape)}")
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
    cfg = dict(_prefill_config(head_dim, q.dtype, group), **(config or {}))
    block_m = cfg["BLOCK_M"]
    block_q = block_m // group
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _paged_prefill_kernel[grid](
        q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_bt=block_tables.stride(0),
        stride_cb=key_cache.stride(0), stride_cs=key_cache.stride(1), stride_ch=key_cache.stride(2),
        num_seqs=num_seqs,
        QUERIES_PER_KV=group,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=cfg["BLOCK_N"],
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad(head_dim),
        D_MASKED=head_dim != head_dim_pad(head_dim),
        BLOCK_SIZE=block_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        KV_FP8=fp8,
        v_scale=v_scale,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **variants.launch_args(seq_lens),
    )
    return out


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
