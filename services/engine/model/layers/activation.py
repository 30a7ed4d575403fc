"""Activation functions by their config.json names, and the gated forms (act(gate) * up) on a fused gate/up."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _gelu_fast(x):  # HF's FastGELUActivation
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_new(x):  # HF's NewGELUActivation (GPT-2)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _relu2(x):  # HF's ReLUSquaredActivation (Jais 2)
    return torch.square(F.relu(x))


ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_python": F.gelu, "relu": F.relu,
    "gelu_pytorch_tanh": _gelu_tanh, "gelu_new": _gelu_new, "gelu_fast": _gelu_fast, "quick_gelu": _quick_gelu,
    "relu2": _relu2,
}


def get_activation(name: str, source: str = "config.json"):
    if name not in ACTIVATIONS:
        raise ValueError(f"{source}: activation {name!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class SiluMulOutput(NamedTuple):
    """A gate/up projection's output already through silu(gate) * up (the W4A16 GEMV does it in its epilogue at
    batch 1: quantization/int4.py); ActAndMul passes it on."""
    y: torch.Tensor


class ActAndMul(torch.nn.Module):
    """[T, 2 * inter] (gate then up) -> act(gate) * up. SiLU uses the fused Triton kernel when `fused`."""

    def __init__(self, name: str, source: str = "config.json"):
        super().__init__()
        self.name, self.act = name, get_activation(name, source)
        self.fused = False

    def forward(self, gate_up: torch.Tensor, quant_for=None) -> torch.Tensor:
        """`quant_for`: the linear layer that alone reads the result (as RMSNorm.forward's). `gate_up` may be an
        FP8Output, whose scales the fused kernels apply (quantization/fp8.py)."""
        from services.engine.model.quantization.fp8 import FP8Output, dense, swiglu_fp8, takes_fp8_input

        if isinstance(gate_up, SiluMulOutput):
            return gate_up.y
        scaled = isinstance(gate_up, FP8Output)
        raw = gate_up.raw if scaled else gate_up
        if self.fused and self.act is F.silu and raw.dim() == 2:
            from kernels.silu_mul import silu_mul

            scales = (gate_up.row, gate_up.col) if scaled else None
            if quant_for is not None and takes_fp8_input(quant_for, raw.shape[0]):
                return swiglu_fp8(raw, quant_for.method.scale_ub, scales=scales)
            return silu_mul(raw, scales=scales)
        gate_up = dense(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up
