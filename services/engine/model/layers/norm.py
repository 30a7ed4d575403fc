"""Normalisation layers with HF's rounding: RMSNorm (Llama's w * x, Gemma's (1 + w) * x), LayerNorm with or
without bias. `forward(x, residual)` also does the residual add first, as the fused GPU kernel does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine.model.layers.linear import expect_dim, load_checked, replicated_loader
from services.engine.model.layers.parallel_state import all_reduce, rank_and_size


class RMSNorm(torch.nn.Module):
    """y = w * rms_norm(x) (Llama: normalised in float32, cast back, then scaled), or with `gemma`
    y = (1 + w) * rms_norm(x) computed in float32 (Gemma stores w - 1).

    `tp_sharded`: x is this rank's slice of a wider vector (OLMo 2's q/k norm over all heads); the mean
    square is all-reduced and the weight split like a column-parallel output."""

    def __init__(self, size: int, eps: float, gemma: bool = False, tp=None, tp_sharded: bool = False,
                 scale_in_float32: bool = False):
        super().__init__()
        self.eps, self.gemma, self.tp = eps, gemma, tp if tp_sharded else None
        self.scale_in_float32 = scale_in_float32  # OLMo 2 multiplies by w before casting back
        self.rank, self.tp_size = rank_and_size(self.tp)
        self.weight = torch.nn.Parameter(torch.empty(size // self.tp_size), requires_grad=False)
        self.weight.weight_loader = self._load if self.tp is not None else replicated_loader
        self.fused = False  # the Triton add + RMSNorm kernel (GPU); set by the model

    def _load(self, param, ckpt, shard_id=None):
        n = param.shape[0]
        expect_dim(ckpt, 0, n * self.tp_size)
        load_checked(param, ckpt.narrow(0, self.rank * n, n), ckpt)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, quant_for=None):
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual). `quant_for`: the
        linear layer that alone reads the result; when it takes FP8 input (quantization/fp8.py,
        takes_fp8_input) the fused kernel returns the result quantized for it, as an FP8Input."""
        from services.engine.model.quantization.fp8 import FP8Output, dense, norm_fp8, takes_fp8_input

        scaled = isinstance(x, FP8Output)  # an FP8 GEMM's output whose scales are applied here, in the kernel
        raw = x.raw if scaled else x
        if self.fused and not (self.gemma or self.scale_in_float32) and self.tp is None and raw.dim() == 2:
            from kernels.fused_norm import add_rms_norm

            xs = (x.row, x.col) if scaled else None
            if quant_for is not None and takes_fp8_input(quant_for, raw.shape[0]):
                out = norm_fp8(raw, residual, self.weight, self.eps, quant_for.method.scale_ub, x_scales=xs)
            else:
                out = add_rms_norm(raw, residual, self.weight, self.eps, x_scales=xs)
            return out if residual is None else (out, residual)  # residual updated in place
        x = dense(x)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        ms = xf.pow(2).mean(-1, keepdim=True)
        if self.tp is not None:
            ms = all_reduce(self.tp, ms) / self.tp_size
        xf = xf * torch.rsqrt(ms + self.eps)
        if self.gemma:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        if self.scale_in_float32:
            return (self.weight.float() * xf).to(x.dtype)
        return self.weight * xf.to(x.dtype)


class LayerNorm(torch.nn.Module):
    """Standard LayerNorm, computed in float32; `bias=False` for the models that have none (Cohere, OLMo).
    `shape` may be [heads, head_dim] for a per-head norm with per-head weights (Cohere's q/k norm); those
    heads are split over tensor-parallel ranks."""

    def __init__(self, shape: int | tuple[int, ...], eps: float, bias: bool = True, affine: bool = True, tp=None):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.rank, self.tp_size = rank_and_size(tp if len(shape) == 2 else None)
        if len(shape) == 2:
            shape = (shape[0] // self.tp_size, shape[1])
        self.eps, self.shape = eps, shape
        self.weight = torch.nn.Parameter(torch.empty(shape), requires_grad=False) if affine else None
        self.bias = torch.nn.Parameter(torch.empty(shape), requires_grad=False) if affine and bias else None
        for p in (self.weight, self.bias):
            if p is not None:
                p.weight_loader = self._load_heads if len(shape) == 2 else replicated_loader

    def _load_heads(self, param, ckpt, shard_id=None):
        n = param.shape[0]
        expect_dim(ckpt, 0, n * self.tp_size)
        load_checked(param, ckpt.narrow(0, self.rank * n, n), ckpt)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, quant_for=None):
        """As RMSNorm.forward; `quant_for` is ignored (no fused FP8 kernel: the linear layer quantizes)."""
        from services.engine.model.quantization.fp8 import dense

        x = dense(x)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        d = self.shape[-1]
        xf = x.float()
        y = F.layer_norm(xf, (d,), eps=self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)
