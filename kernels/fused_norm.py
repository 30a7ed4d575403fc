"""Fused residual add + normalisation: one read of the hidden states instead of the ~8 elementwise
kernels that the torch expression launches per norm (two norms per layer).

RMSNorm in the three roundings of transformers: Llama (normalised in float32, cast to the model dtype,
then scaled by the weight), Gemma ((1 + w) * x, all in float32, cast once) and OLMo 2 (w * x in float32,
cast once); LayerNorm with or without weight and bias (float32 statistics, cast once, as
nn.LayerNorm). The residual sum is rounded to the model dtype first, as the unfused model does."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.fp8_quant import quantize_row, row_scale

WARPS: int | None = None
"""Warps per row program; None: one per 256 columns, 1..16 (16 at hidden 4096). bench/w4a16.py's chain section and
its +normwN engine runs set it to measure a batch-1 decode step's 65 norm launches against other widths."""


@triton.jit
def residual_prologue(x_ptr, residual_ptr, xr_ptr, xc_ptr, row, stride_x, stride_r, offs, mask,
                      HAS_RESIDUAL: tl.constexpr, X_SCALED: tl.constexpr):
    """One row's x (times its row and column scales when X_SCALED, rounded to the model dtype) plus the
    residual, stored back into it; the norm kernels here and in kernels/fp8_fused.py start with it."""
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if X_SCALED:
        xc = tl.load(xc_ptr + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) * tl.load(xr_ptr + row) * xc).to(x_ptr.dtype.element_ty)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + offs, x, mask=mask)
    return x


@triton.jit
def _add_norm_kernel(
    x_ptr,  # [num_tokens, hidden]: input (the layer's new output, or the embeddings)
    residual_ptr,  # [num_tokens, hidden]: running residual; read when HAS_RESIDUAL, then overwritten with x + residual
    weight_ptr,  # [hidden] (read if HAS_WEIGHT)
    bias_ptr,  # [hidden] (read if HAS_BIAS)
    out_ptr,  # [num_tokens, hidden]: the normalised, scaled result
    stride_x,
    stride_r,
    stride_o,
    hidden,
    eps,
    weight_offset,  # Gemma stores w - 1: the scale is weight_offset + w
    s_ptr,  # [num_tokens] float32 per-token scales (QUANT)
    ub,  # the bound on a token's amax (QUANT and HAS_UB)
    xr_ptr,  # [num_tokens] float32: x's row scales (X_SCALED)
    xc_ptr,  # [hidden] float32: x's column scales (X_SCALED)
    HAS_RESIDUAL: tl.constexpr,
    LAYER_NORM: tl.constexpr,  # subtract the mean (LayerNorm) or not (RMSNorm)
    SCALE_IN_FP32: tl.constexpr,  # scale before rounding (Gemma, OLMo 2, LayerNorm) or after (Llama)
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    QUANT: tl.constexpr,  # out is float8 e4m3: the 16-bit result quantized per token (kernels/fp8_quant.py)
    HAS_UB: tl.constexpr,
    X_SCALED: tl.constexpr,  # x is an FP8 GEMM's unscaled output: x * xr[row] * xc, rounded as the GEMM would
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,  # kernels/pdl.py
):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = residual_prologue(x_ptr, residual_ptr, xr_ptr, xc_ptr, row, stride_x, stride_r, offs, mask,
                          HAS_RESIDUAL, X_SCALED)
    xf = x.to(tl.float32)
    if LAYER_NORM:
        xf = tl.where(mask, xf - tl.sum(xf, axis=0) / hidden, 0.0)
    var = tl.sum(xf * xf, axis=0) / hidden
    normed = xf * tl.rsqrt(var + eps)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32) + weight_offset
    else:
        w = tl.full([BLOCK], 1.0, tl.float32)
    if SCALE_IN_FP32:
        y = normed * w
    else:
        y = w * normed.to(x_ptr.dtype.element_ty).to(tl.float32)  # the model dtype (out may be fp8)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if QUANT:  # what quantize_fp8_rows does to the unfused norm's output, without writing or reading it
        y = tl.where(mask, y.to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)
        scale = row_scale(tl.max(tl.abs(y), axis=0), ub, HAS_UB)
        tl.store(s_ptr + row, scale)
        y = quantize_row(y, scale)
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + offs, y, mask=mask)


def _check(x, residual, weight, bias):
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [num_tokens, hidden] with a contiguous last dim; got {tuple(x.shape)}")
    hidden = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (hidden,) or t.stride(-1) != 1):
            raise ValueError(f"{name} must be [{hidden}]; got {tuple(t.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1 or residual.dtype != x.dtype):
        raise ValueError("residual must match x in shape and dtype with a contiguous last dim")


def _launch(x, residual, weight, bias, eps, weight_offset, layer_norm, scale_in_fp32, quant=False, ub=None,
            x_scales=None):
    _check(x, residual, weight, bias)
    if x_scales is not None and (x_scales[0].numel() != x.shape[0] or x_scales[1].numel() != x.shape[1]
                                 or x_scales[0].dtype != torch.float32 or x_scales[1].dtype != torch.float32):
        raise ValueError(f"x_scales must be float32 [{x.shape[0]}] and [{x.shape[1]}] row and column scales")
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn if quant else x.dtype, device=x.device)
    scales = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device) if quant else out
    if x.shape[0] == 0:
        return (out, scales) if quant else out
    block = triton.next_power_of_2(x.shape[1])
    r = residual if residual is not None else x
    _add_norm_kernel[(x.shape[0],)](
        x, r, weight if weight is not None else x, bias if bias is not None else x, out,
        x.stride(0), r.stride(0), out.stride(0), x.shape[1], eps, weight_offset, scales,
        float(ub) if ub is not None else 0.0, *(x_scales if x_scales is not None else (scales, scales)),
        HAS_RESIDUAL=residual is not None, LAYER_NORM=layer_norm, SCALE_IN_FP32=scale_in_fp32,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, QUANT=quant, HAS_UB=ub is not None,
        X_SCALED=x_scales is not None,
        BLOCK=block, num_warps=WARPS or min(16, max(1, block // 256)), **pdl.args(x),
    )
    return (out, scales) if quant else out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 weight_offset: float = 0.0, scale_in_float32: bool = False, x_scales=None):
    """Returns rms_norm(x + residual) * (weight_offset + weight); when `residual` is given it is updated
    in place to x + residual. x, residual [num_tokens, hidden] (rows may be strided, last dim
    contiguous); weight [hidden]. Llama: defaults; Gemma: weight_offset=1, scale_in_float32=True;
    OLMo 2: scale_in_float32=True. `x_scales` (row [num_tokens], column [hidden], float32): x is an FP8
    GEMM's output before its scales, and x * row * column rounded to x's dtype takes its place."""
    return _launch(x, residual, weight, None, eps, weight_offset, False, scale_in_float32, x_scales=x_scales)


def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     ub: float | None = None, x_scales=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's add_rms_norm followed by FP8 quantization per token in the same pass: returns
    (float8_e4m3fn [num_tokens, hidden], float32 scales [num_tokens, 1]), bit for bit
    quantize_fp8_rows(add_rms_norm(x, residual, weight, eps, x_scales=x_scales), ub=ub); `residual` is
    updated in place."""
    return _launch(x, residual, weight, None, eps, 0.0, False, False, quant=True, ub=ub, x_scales=x_scales)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Returns layer_norm(x + residual) * weight + bias (either may be None); `residual` is updated in
    place to x + residual when given. Shapes as add_rms_norm."""
    return _launch(x, residual, weight, bias, eps, 0.0, True, True)


def add_rms_norm_ref(x, residual, weight, eps, weight_offset=0.0, scale_in_float32=False):
    """Torch reference (HF's LlamaRMSNorm / GemmaRMSNorm / Olmo2RMSNorm after the residual add)."""
    if residual is not None:
        x = x + residual
        residual.copy_(x)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if scale_in_float32:
        return ((weight_offset + weight.float()) * xf).to(x.dtype)
    return (weight_offset + weight) * xf.to(x.dtype)


def add_layer_norm_ref(x, residual, weight, bias, eps):
    """Torch reference (nn.functional.layer_norm after the residual add)."""
    if residual is not None:
        x = x + residual
        residual.copy_(x)
    return torch.nn.functional.layer_norm(x.float(), x.shape[-1:], weight.float() if weight is not None else None,
                                          bias.float() if bias is not None else None, eps).to(x.dtype)
