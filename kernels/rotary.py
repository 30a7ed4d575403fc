"""Rotary position embedding applied in place to the q and k heads of the fused qkv projection: one
launch for both, instead of the slice / negate / concatenate / multiply / add chain per tensor."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    qkv_ptr,  # [num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim]: q heads, then k heads, then v
    cos_ptr,  # fp32 [num_tokens, head_dim // 2]
    sin_ptr,  # fp32 [num_tokens, head_dim // 2]
    stride_t,
    num_rot_heads,  # q heads + k heads (v is left alone)
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    mask = (offs_h < num_rot_heads)[:, None]
    base = qkv_ptr + tok * stride_t + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + tok * HALF + offs_d)[None, :]
    s = tl.load(sin_ptr + tok * HALF + offs_d)[None, :]
    # HF's rotate_half convention: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)
    tl.store(base, (x1 * c - x2 * s).to(qkv_ptr.dtype.element_ty), mask=mask)
    tl.store(base + HALF, (x2 * c + x1 * s).to(qkv_ptr.dtype.element_ty), mask=mask)


def rotary_inplace(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_q_heads: int, num_kv_heads: int,
                   head_dim: int) -> None:
    """qkv [num_tokens, (hq + 2 hkv) * head_dim] (last dim contiguous); cos, sin fp32 [num_tokens, head_dim // 2]."""
    if qkv.dim() != 2 or qkv.stride(-1) != 1 or qkv.shape[1] != (num_q_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv must be [num_tokens, {(num_q_heads + 2 * num_kv_heads) * head_dim}]; got {tuple(qkv.shape)}")
    half = head_dim // 2
    if cos.shape != (qkv.shape[0], half) or sin.shape != cos.shape or cos.dtype != torch.float32:
        raise ValueError(f"cos and sin must be float32 [{qkv.shape[0]}, {half}]")
    if qkv.shape[0] == 0:
        return
    heads = num_q_heads + num_kv_heads
    _rotary_kernel[(qkv.shape[0],)](qkv, cos.contiguous(), sin.contiguous(), qkv.stride(0), heads,
                                    HALF=half, BLOCK_H=triton.next_power_of_2(heads), num_warps=4)


def rotary_ref(qkv, cos, sin, num_q_heads, num_kv_heads, head_dim):
    """Torch reference, in float32, rounded once."""
    t = qkv.shape[0]
    heads = num_q_heads + num_kv_heads
    x = qkv[:, :heads * head_dim].view(t, heads, head_dim).float()
    half = head_dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    qkv[:, :heads * head_dim] = out.reshape(t, heads * head_dim).to(qkv.dtype)
