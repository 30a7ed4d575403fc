"""Fused residual add + RMSNorm: one read of the hidden states instead of the ~8 elementwise kernels
that the torch expression launches per norm (two norms per layer). Matches HF's rounding: the sum is
rounded to the model dtype, normalised in float32, cast back, then scaled by the weight."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,  # [num_tokens, hidden]: input (the layer's new output, or the embeddings)
    residual_ptr,  # [num_tokens, hidden]: running residual; read when HAS_RESIDUAL, then overwritten with x + residual
    weight_ptr,  # [hidden]
    out_ptr,  # [num_tokens, hidden]: the normalised, scaled result
    stride_x,
    stride_r,
    stride_o,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / hidden
    normed = (xf * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Returns rms_norm(x + residual) * weight; when `residual` is given it is updated in place to x + residual.
    x, residual [num_tokens, hidden] (rows may be strided, last dim contiguous); weight [hidden]."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [num_tokens, hidden] with a contiguous last dim; got {tuple(x.shape)}")
    hidden = x.shape[1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}]; got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1 or residual.dtype != x.dtype):
        raise ValueError("residual must match x in shape and dtype with a contiguous last dim")
    out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out
    block = triton.next_power_of_2(hidden)
    r = residual if residual is not None else x
    _add_rms_norm_kernel[(x.shape[0],)](
        x, r, weight, out, x.stride(0), r.stride(0), out.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )
    return out


def add_rms_norm_ref(x, residual, weight, eps):
    """Torch reference (HF's LlamaRMSNorm after the residual add)."""
    if residual is not None:
        x = x + residual
        residual.copy_(x)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
