"""FP8 KV cache: the pool dtype a `kv_cache_dtype` names, where it can run, e4m3 (de)quantization, and the
checkpoint's per-layer k/v scale tensors.

A stored key is `fp8(clamp(k / k_scale, +-448))` (round to nearest even) and is read back as
`float(stored) * k_scale`; values likewise with v_scale. The scales are per layer and per tensor, as vLLM
reads them: from the checkpoint where it has them, else 1.0.
"""

from __future__ import annotations

import re

import torch

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # largest finite e4m3fn value; e4m3fn has no infinity, so larger values are clamped

# Checkpoint names of per-tensor KV scales, as vLLM reads them: `...layers.N.self_attn.k_scale` / `v_scale`
# (llm-compressor, AutoFP8, ModelOpt and Quark put them on the attention or on k_proj / v_proj), the older
# single `...kv_scale` for both, and compressed-tensors' `...k_proj.output_scale` / `v_proj.output_scale`.
_SCALE_NAME = re.compile(r"\.(\d+)\.(?:.*\.)?(k_scale|v_scale|kv_scale)$")
_OUTPUT_SCALE_NAME = re.compile(r"\.(\d+)\.(?:.*\.)?(k_proj|v_proj)\.output_scale$")


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device,
                           attention_backend: str) -> torch.dtype:
    """The pool's torch dtype; ValueError naming the field when the name is unknown or the device and
    attention backend cannot store or read float8 e4m3."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    if device.type == "cuda" and attention_backend == "triton":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(
                f"kv_cache_dtype {kv_cache_dtype!r}: the triton attention kernels need hardware float8 e4m3 "
                f"(compute capability >= 8.9: Ada, Hopper or newer); {device} is {major}.{minor}. "
                f"Use kv_cache_dtype 'auto' or attention_backend 'torch'")
    elif device.type not in ("cuda", "cpu"):
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}: supported on cuda and cpu devices, not {device.type}")
    return FP8_KV_DTYPE


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_KV_DTYPE


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale in float8 e4m3 (float32 math, clamped to the finite range, round to nearest even).
    Multiplying by 1 / scale, as the kernels do, keeps the two bit-identical."""
    return (x.float() * (1.0 / scale)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_KV_DTYPE)


def quantize_kv_fp8(kv: torch.Tensor, k_scale: float, v_scale: float) -> torch.Tensor:
    """A whole [2, ...] K/V pool (keys, values) in e4m3 (benchmarks and tests build fp8 pools with it)."""
    out = fp8_zeros(kv.shape, kv.device)
    out[0].copy_(quantize_fp8(kv[0], k_scale))
    out[1].copy_(quantize_fp8(kv[1], v_scale))
    return out


def fp8_zeros(shape, device) -> torch.Tensor:
    """Zero bytes viewed as e4m3 (+0.0): allocating bytes needs no float8 fill kernel on the device."""
    return torch.zeros(shape, dtype=torch.uint8, device=device).view(FP8_KV_DTYPE)


def dequantize_fp8(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (x.float() * scale).to(dtype)


def kv_scale_target(name: str) -> tuple[int, str] | None:
    """A checkpoint tensor name -> (layer index, "k" | "v" | "kv") when it is a KV-cache scale, else None."""
    m = _SCALE_NAME.search(name)
    if m:
        return int(m.group(1)), m.group(2).removesuffix("_scale")
    m = _OUTPUT_SCALE_NAME.search(name)
    if m:
        return int(m.group(1)), m.group(2)[0]
    return None


def read_kv_scale(name: str, where: str, t: torch.Tensor) -> float:
    """The scalar a checkpoint's KV scale tensor holds; ValueError naming the tensor if it is not one
    finite positive number (Folio's pool has one scale per layer for keys and one for values)."""
    if t.numel() != 1:
        raise ValueError(f"{where}: tensor {name} has shape {tuple(t.shape)}; KV-cache scales must be per-tensor "
                         f"(one number per layer)")
    value = float(t.float().reshape(()))
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{where}: tensor {name} = {value}; a KV-cache scale must be finite and > 0")
    return value
