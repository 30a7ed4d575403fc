"""Per-layer attention settings that a model passes to the backend with every call.

One object per attention layer, built once at model construction. Backends must honour every field
or refuse it at construction time (`check_supported`), never ignore it silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionParams:
    scale: float
    """Multiplies q.k before the softmax (usually head_dim ** -0.5; some models override it)."""
    sliding_window: int | None = None
    """A query at position p attends to keys at positions p - sliding_window + 1 ... p (that many keys,
    itself included), as transformers' sliding-window masks do. None: the whole causal prefix."""
    logit_softcap: float | None = None
    """Scores become softcap * tanh(scores / softcap) after scaling, before masking (Gemma 2)."""
    alibi_slopes: torch.Tensor | None = None
    """float32 [num_heads] (this rank's heads): score += slope_h * (key_pos - query_pos) (BLOOM, MPT)."""
    sinks: torch.Tensor | None = None
    """float32 [num_heads]: a per-head logit that joins the softmax's denominator but attends to no
    value (gpt-oss's attention sinks)."""
    k_scale: float = 1.0
    """An fp8 pool stores k / k_scale and reads it back times k_scale (the checkpoint's per-layer scale, else
    1.0; see attention/kv_quant.py). Unused when the pool is in the model's dtype."""
    v_scale: float = 1.0
    """The same for values."""

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"logit_softcap must be > 0, got {self.logit_softcap}")
        for name in ("k_scale", "v_scale"):
            value = getattr(self, name)
            if not (value > 0 and value < float("inf")):
                raise ValueError(f"{name} must be finite and > 0, got {value}")
