"""Attention backends behind one seam: `torch` (reference, CPU) and `triton` (paged kernels)."""

from __future__ import annotations

import typing

BackendName = typing.Literal["torch", "triton"]
BACKENDS = typing.get_args(BackendName)


def get_attention_backend(name: str):
    if name == "torch":
        from services.engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from services.engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")


def default_backend(device: str) -> str:
    return "triton" if str(device).startswith("cuda") else "torch"
