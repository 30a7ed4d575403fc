"""The batch-1 qkv GEMV's rotary + KV-cache epilogue (`gemv3` with ROPE): the program that completes a column strip
of q, k, v turns its q and k heads (NeoX rotary, whole head) and writes its k and v heads into the paged cache, as
kernels/rotary.py's rotary_and_cache would after the GEMV: a launch fewer per layer, and no global step (each strip
holds whole heads, so each strip is finished on its own).

Rounding as the unfused path: each output is rounded to x's dtype first (the GEMV's stored q, k, v), then turned in
float32 as `_rotary_cache_kernel` turns it (x1 c - x2 s, x2 c + x1 s) and rounded again. The GEMV's output holds the
turned q and k and the plain v, where rotary_and_cache leaves the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rope_strip_done(acc, offs_n, n_mask, col, split_k, out_ptr, ws_ptr, cnt_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr,
                    slot_ptr, q_cols, k_cols, stride_cb, stride_cs, stride_ch, HEAD_DIM: tl.constexpr,
                    CACHE_BS: tl.constexpr):
    """Add this program's sums for strip `col` (columns offs_n, whole heads) into the workspace; the last of its
    split_k programs reads the strip's totals and each column's rotary partner (d +- HEAD_DIM / 2 in its head: the
    same strip), writes q | k (turned) | v to out, k and v to the cache row of slot_ptr[0] (skipped when negative),
    and leaves workspace and counter zeroed. Through the workspace even unsplit (the partner is another thread's)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    tl.atomic_add(ws_ptr + offs_n, acc, mask=n_mask, sem="relaxed")
    tl.debug_barrier()  # every thread's adds are issued before the release below publishes them
    done = tl.atomic_add(cnt_ptr + col, 1, sem="acq_rel")
    if done == split_k - 1:
        dt = out_ptr.dtype.element_ty
        d = offs_n % HEAD_DIM
        first = d < HALF
        partner = tl.where(first, offs_n + HALF, offs_n - HALF)
        zero = tl.zeros_like(acc)
        x = tl.atomic_add(ws_ptr + offs_n, zero, mask=n_mask, sem="relaxed")  # read at L2, not L1
        xp = tl.atomic_add(ws_ptr + partner, zero, mask=n_mask, sem="relaxed")
        x = tl.where(n_mask, x, 0.0).to(dt).to(tl.float32)  # as the GEMV would store it
        xp = tl.where(n_mask, xp, 0.0).to(dt).to(tl.float32)
        c = tl.load(cos_ptr + d % HALF)
        s = tl.load(sin_ptr + d % HALF)
        turned = tl.where(first, x * c - xp * s, x * c + xp * s)
        rot = offs_n < q_cols + k_cols
        y = tl.where(rot, turned, x).to(dt)
        tl.store(out_ptr + offs_n, y, mask=n_mask)
        slot = tl.load(slot_ptr)
        if slot >= 0:
            row = (slot // CACHE_BS) * stride_cb + (slot % CACHE_BS) * stride_cs
            is_k = (offs_n >= q_cols) & rot & n_mask
            is_v = (offs_n >= q_cols + k_cols) & n_mask
            j = tl.where(is_v, offs_n - q_cols - k_cols, offs_n - q_cols)  # column within k or v
            dst = row + (j // HEAD_DIM) * stride_ch + j % HEAD_DIM
            tl.store(kc_ptr + dst, y, mask=is_k)
            tl.store(vc_ptr + dst, y, mask=is_v)
        tl.debug_barrier()  # every partner value is read before any is zeroed
        tl.store(ws_ptr + offs_n, zero, mask=n_mask)
        tl.store(cnt_ptr + col, 0)


def rope_args(rope, n: int, block_n: int, dtype: torch.dtype) -> tuple | None:
    """The ROPE launch arguments for rope = (cos, sin, kv_cache, slot_mapping, head_dim, num_q_heads, num_kv_heads)
    of one token, or None where this epilogue cannot do it (the caller then runs rotary_and_cache): N is
    (hq + 2 hkv) d, the strips hold whole heads, d a power of two, cos and sin float32 [1, d / 2], a contiguous
    [2, blocks, block_size, hkv, d] cache in x's dtype, one int64 slot."""
    cos, sin, kv_cache, slots, d, hq, hkv = rope
    if not (d >= 2 and d & (d - 1) == 0 and n == (hq + 2 * hkv) * d and block_n % d == 0
            and cos.dtype == sin.dtype == torch.float32 and tuple(cos.shape) == tuple(sin.shape) == (1, d // 2)
            and cos.is_contiguous() and sin.is_contiguous() and kv_cache.dim() == 5 and kv_cache.shape[0] == 2
            and tuple(kv_cache.shape[3:]) == (hkv, d) and kv_cache.dtype == dtype and kv_cache.is_contiguous()
            and slots.dtype == torch.int64 and slots.numel() == 1):
        return None
    kc, vc = kv_cache[0], kv_cache[1]
    return ((cos, sin, kc, vc, slots, hq * d, hkv * d, kc.stride(0), kc.stride(1), kc.stride(2)),
            dict(ROPE=True, HEAD_DIM=d, CACHE_BS=kv_cache.shape[2]))


def rope_reference(y: torch.Tensor, rope) -> torch.Tensor:
    """What the epilogue leaves, by torch: y [1, (hq + 2 hkv) d] (the GEMV's output in its dtype) with q and k turned
    (NeoX, float32, rounded), k and v written into the cache at the slot; returns the turned y."""
    cos, sin, kv_cache, slots, d, hq, hkv = rope
    half = d // 2
    t = y.float().reshape(hq + 2 * hkv, d)
    x1, x2 = t[:hq + hkv, :half], t[:hq + hkv, half:]
    out = t.clone()
    out[:hq + hkv, :half] = (x1 * cos - x2 * sin).to(y.dtype).float()
    out[:hq + hkv, half:] = (x2 * cos + x1 * sin).to(y.dtype).float()
    out = out.to(y.dtype)
    slot = int(slots.reshape(-1)[0])
    if slot >= 0:
        bs = kv_cache.shape[2]
        kv_cache[0, slot // bs, slot % bs] = out[hq:hq + hkv]
        kv_cache[1, slot // bs, slot % bs] = out[hq + hkv:]
    return out.reshape(1, -1)


__all__ = ["rope_strip_done", "rope_args", "rope_reference"]
