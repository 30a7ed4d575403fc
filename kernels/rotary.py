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
