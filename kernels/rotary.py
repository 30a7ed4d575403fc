"""Rotary position embedding applied in place to the q and k heads of the fused qkv projection: one
launch for both, instead of the slice / negate / concatenate / multiply / add chain per tensor.

Both layouts of transformers: NeoX / Llama `rotate_half` (dimension i pairs with i + rotary_dim / 2)
and GPT-J `rotate_every_two` (interleaved: 2i pairs with 2i + 1); partial rotary (only the first
`rotary_dim` dimensions of each head turn, the rest pass through: Phi, GPT-NeoX, StableLM, GLM).
Any even rotary_dim: the half is padded to a power of two with masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl


@triton.jit
def _rotary_kernel(
    qkv_ptr,  # [num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim]: q heads, then k heads, then v
    cos_ptr,  # fp32 [num_tokens, rotary_dim // 2]
    sin_ptr,  # fp32 [num_tokens, rotary_dim // 2]
    stride_t,
    num_rot_heads,  # q heads + k heads (v is left alone)
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,  # rotary_dim // 2
    HALF_PAD: tl.constexpr,  # next power of two; the extra lanes are masked
    INTERLEAVED: tl.constexpr,  # GPT-J pairs (2i, 2i + 1); else NeoX pairs (i, i + HALF)
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr = False,  # kernels/pdl.py
):
    pdl.enter(PDL)
    tok = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF_PAD)
    d_ok = offs_d < HALF
    mask = (offs_h < num_rot_heads)[:, None] & d_ok[None, :]
    head = qkv_ptr + tok * stride_t + offs_h[:, None] * HEAD_DIM
    if INTERLEAVED:
        p1 = head + 2 * offs_d[None, :]
        p2 = p1 + 1
    else:
        p1 = head + offs_d[None, :]
        p2 = p1 + HALF
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + tok * HALF + offs_d, mask=d_ok, other=0.0)[None, :]
    s = tl.load(sin_ptr + tok * HALF + offs_d, mask=d_ok, other=0.0)[None, :]
    # (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), in both layouts
    tl.store(p1, (x1 * c - x2 * s).to(qkv_ptr.dtype.element_ty), mask=mask)
    tl.store(p2, (x2 * c + x1 * s).to(qkv_ptr.dtype.element_ty), mask=mask)


def rotary_inplace(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_q_heads: int, num_kv_heads: int,
                   head_dim: int, rotary_dim: int | None = None, interleaved: bool = False) -> None:
    """qkv [num_tokens, (hq + 2 hkv) * head_dim] (last dim contiguous); cos, sin fp32
    [num_tokens, rotary_dim // 2] (rotary_dim defaults to head_dim). Turns the first rotary_dim
    dimensions of every q and k head; v and the other dimensions are left as they are."""
    if qkv.dim() != 2 or qkv.stride(-1) != 1 or qkv.shape[1] != (num_q_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv must be [num_tokens, {(num_q_heads + 2 * num_kv_heads) * head_dim}]; got {tuple(qkv.shape)}")
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim must be even and in [2, head_dim={head_dim}]; got {rotary_dim}")
    half = rotary_dim // 2
    if cos.shape != (qkv.shape[0], half) or sin.shape != cos.shape or cos.dtype != torch.float32:
        raise ValueError(f"cos and sin must be float32 [{qkv.shape[0]}, {half}]")
    if qkv.shape[0] == 0:
        return
    _launch(qkv, cos, sin, num_q_heads + num_kv_heads, head_dim, half, interleaved)


def _launch(qkv, cos, sin, heads: int, head_dim: int, half: int, interleaved: bool) -> None:
    _rotary_kernel[(qkv.shape[0],)](qkv, cos.contiguous(), sin.contiguous(), qkv.stride(0), heads,
                                    HEAD_DIM=head_dim, HALF=half, HALF_PAD=triton.next_power_of_2(half),
                                    INTERLEAVED=interleaved, BLOCK_H=triton.next_power_of_2(heads), num_warps=4,
                                    **pdl.args(qkv))


def rotary_qk_inplace(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> bool:
    """Full-width NeoX rotary on q [T, hq * head_dim] and k [T, hkv * head_dim] in one launch, where they lie
    side by side in one buffer (each row's k starts right after its q, as a fused qkv's split gives): batch-1
    decode runs a launch fewer per layer. Returns False, having done nothing, where they do not."""
    size = q.element_size()
    if not (q.dim() == k.dim() == 2 and q.shape[0] == k.shape[0] and q.dtype == k.dtype and q.device == k.device
            and q.stride(1) == k.stride(1) == 1 and q.stride(0) == k.stride(0)
            and k.data_ptr() == q.data_ptr() + q.shape[1] * size and q.shape[1] % head_dim == 0
            and k.shape[1] % head_dim == 0 and head_dim % 2 == 0):
        return False
    half = head_dim // 2
    if cos.shape != (q.shape[0], half) or sin.shape != cos.shape or cos.dtype != torch.float32:
        raise ValueError(f"cos and sin must be float32 [{q.shape[0]}, {half}]")
    if q.shape[0]:
        _launch(q, cos, sin, (q.shape[1] + k.shape[1]) // head_dim, head_dim, half, False)
    return True


@triton.jit
def _rotary_cache_kernel(
    qkv_ptr,  # [num_tokens, (num_q_heads + 2 * num_kv_heads) * HEAD_DIM] rows (stride_t apart): q, k, v heads
    cos_ptr,  # fp32 [num_tokens, HALF]
    sin_ptr,
    key_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM], in qkv's dtype
    value_cache_ptr,
    slot_mapping_ptr,  # int64 [num_tokens]; a negative slot is padding (rotated, not cached)
    stride_t,
    num_q_heads,
    num_kv_heads,
    stride_cb,  # cache block stride (key and value caches alike)
    stride_cs,  # cache slot-in-block stride
    stride_ch,  # cache head stride
    HEAD_DIM: tl.constexpr,  # a power of two
    HALF: tl.constexpr,  # HEAD_DIM // 2
    BLOCK_H: tl.constexpr,  # next power of two of q + k heads
    BLOCK_KV: tl.constexpr,  # next power of two of kv heads
    BLOCK_SIZE: tl.constexpr,
    PDL: tl.constexpr = False,  # kernels/pdl.py
    SCALED: tl.constexpr = False,  # qkv is an FP8 GEMM's unscaled output: times row_ptr[tok] * col_ptr[column] first
    row_ptr=None,  # fp32 [num_tokens] (read if SCALED)
    col_ptr=None,  # fp32 [(num_q_heads + 2 * num_kv_heads) * HEAD_DIM] (read if SCALED)
):
    """One token: NeoX rotary on its q and k heads in place, and its rotated k and its v written to the paged
    cache at its slot (what _rotary_kernel then reshape_and_cache do, in one launch: k is not read back). With
    SCALED each value is first scaled and rounded to qkv's dtype as the FP8 GEMM would have (FP8Output.dense), and
    v is stored back scaled too (a prefill step's attention reads the chunk's values from qkv)."""
    pdl.enter(PDL)
    tok = tl.program_id(0).to(tl.int64)
    heads = num_q_heads + num_kv_heads
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    rot = (offs_h < heads)[:, None]
    p1 = qkv_ptr + tok * stride_t + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    p2 = p1 + HALF
    x1 = tl.load(p1, mask=rot, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=rot, other=0.0).to(tl.float32)
    if SCALED:
        rs = tl.load(row_ptr + tok)
        c1 = col_ptr + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
        x1 = (x1 * rs * tl.load(c1, mask=rot, other=0.0)).to(qkv_ptr.dtype.element_ty).to(tl.float32)
        x2 = (x2 * rs * tl.load(c1 + HALF, mask=rot, other=0.0)).to(qkv_ptr.dtype.element_ty).to(tl.float32)
    c = tl.load(cos_ptr + tok * HALF + offs_d)[None, :]
    s = tl.load(sin_ptr + tok * HALF + offs_d)[None, :]
    y1 = (x1 * c - x2 * s).to(qkv_ptr.dtype.element_ty)
    y2 = (x2 * c + x1 * s).to(qkv_ptr.dtype.element_ty)
    tl.store(p1, y1, mask=rot)  # k too: a prefill step's attention reads the chunk's keys from qkv
    tl.store(p2, y2, mask=rot)
    slot = tl.load(slot_mapping_ptr + tok)
    if slot >= 0:
        cache_row = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
        kh = offs_h - num_q_heads  # row i >= num_q_heads is k head i - num_q_heads; q rows are masked off
        is_k = ((offs_h >= num_q_heads) & (offs_h < heads))[:, None]
        dst = key_cache_ptr + cache_row + kh[:, None] * stride_ch + offs_d[None, :]
        tl.store(dst, y1, mask=is_k)
        tl.store(dst + HALF, y2, mask=is_k)
    if SCALED or slot >= 0:
        offs_v = tl.arange(0, BLOCK_KV)
        offs_e = tl.arange(0, HEAD_DIM)
        is_v = (offs_v < num_kv_heads)[:, None]
        pv = qkv_ptr + tok * stride_t + (heads + offs_v)[:, None] * HEAD_DIM + offs_e[None, :]
        v = tl.load(pv, mask=is_v)
        if SCALED:
            cv = tl.load(col_ptr + (heads + offs_v)[:, None] * HEAD_DIM + offs_e[None, :], mask=is_v, other=0.0)
            v = (v.to(tl.float32) * tl.load(row_ptr + tok) * cv).to(qkv_ptr.dtype.element_ty)
            tl.store(pv, v, mask=is_v)
        if slot >= 0:
            tl.store(value_cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
                     + offs_v[:, None] * stride_ch + offs_e[None, :], v, mask=is_v)


def rotary_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     kv_cache: torch.Tensor, slot_mapping: torch.Tensor, head_dim: int, scales=None) -> bool:
    """Full-width NeoX rotary on q [T, hq * d] and k [T, hkv * d] in place, and k (rotated) and v [T, hkv * d]
    written to kv_cache [2, blocks, block_size, hkv, d] at slot_mapping [T] (slots < 0 skipped): rotary_qk_inplace
    then reshape_and_cache in one launch per layer. Only where q, k and v are the side-by-side parts of one fused
    qkv's rows, d is a power of two and the cache is in their dtype (an fp8 cache quantizes in reshape_and_cache);
    returns False, having done nothing, elsewhere. `scales` (float32 row [T, 1], column [1, (hq + 2 hkv) d]): q, k,
    v are an FP8 GEMM's unscaled output (quantization/fp8.py's FP8Output), scaled first, and v stored back scaled."""
    size = q.element_size()
    hkv = k.shape[1] // head_dim if k.dim() == 2 else 0
    if not (q.dim() == k.dim() == v.dim() == 2 and q.shape[0] == k.shape[0] == v.shape[0] and k.shape == v.shape
            and q.dtype == k.dtype == v.dtype == kv_cache.dtype and q.stride(1) == k.stride(1) == v.stride(1) == 1
            and q.stride(0) == k.stride(0) == v.stride(0)
            and k.data_ptr() == q.data_ptr() + q.shape[1] * size and v.data_ptr() == k.data_ptr() + k.shape[1] * size
            and head_dim >= 2 and head_dim & (head_dim - 1) == 0 and q.shape[1] % head_dim == 0
            and k.shape[1] % head_dim == 0 and kv_cache.dim() == 5 and kv_cache.shape[0] == 2
            and tuple(kv_cache.shape[3:]) == (hkv, head_dim) and kv_cache.is_contiguous()
            and slot_mapping.dtype == torch.int64 and slot_mapping.shape == (q.shape[0],)):
        return False
    if scales is not None and (scales[0].numel() != q.shape[0] or scales[1].numel() != q.shape[1] + 2 * k.shape[1]
                               or scales[0].dtype != torch.float32 or scales[1].dtype != torch.float32):
        raise ValueError(f"scales must be float32 [{q.shape[0]}] and [{q.shape[1] + 2 * k.shape[1]}] row and column "
                         f"scales")
    half = head_dim // 2
    if cos.shape != (q.shape[0], half) or sin.shape != cos.shape or cos.dtype != torch.float32:
        raise ValueError(f"cos and sin must be float32 [{q.shape[0]}, {half}]")
    if q.shape[0]:
        hq = q.shape[1] // head_dim
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        _rotary_cache_kernel[(q.shape[0],)](
            q, cos.contiguous(), sin.contiguous(), key_cache, value_cache, slot_mapping, q.stride(0), hq, hkv,
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            HEAD_DIM=head_dim, HALF=half, BLOCK_H=triton.next_power_of_2(hq + hkv), BLOCK_KV=triton.next_power_of_2(hkv),
            BLOCK_SIZE=kv_cache.shape[2], num_warps=4, **pdl.args(q), SCALED=scales is not None,
            row_ptr=scales[0] if scales is not None else None, col_ptr=scales[1] if scales is not None else None)
    return True


def rotary_ref(qkv, cos, sin, num_q_heads, num_kv_heads, head_dim, rotary_dim=None, interleaved=False):
    """Torch reference, in float32, rounded once."""
    t = qkv.shape[0]
    heads = num_q_heads + num_kv_heads
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    x = qkv[:, :heads * head_dim].view(t, heads, head_dim)
    rot = x[..., :rotary_dim].float()
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :rotary_dim // 2], rot[..., rotary_dim // 2:]
    c, s = cos[:, None, :], sin[:, None, :]
    y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    out = torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
    x[..., :rotary_dim] = out.to(qkv.dtype)
