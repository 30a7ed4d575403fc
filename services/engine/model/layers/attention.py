"""The attention layer as a model sees it: this rank's heads, the layer's AttentionParams (scale, sliding
window, soft-cap, ALiBi slopes), and the call into the engine's attention backend over the paged cache."""

from __future__ import annotations

import dataclasses
import math

import torch

from services.engine.attention.params import AttentionParams
from services.engine.model.layers.parallel_state import rank_and_size


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's per-head slopes (BLOOM's and MPT's formula): a geometric sequence from 2^(-8/n)
    for the closest power of two n, with the odd-indexed slopes of 2n appended for the remaining heads."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


class Attention(torch.nn.Module):
    """One layer's attention over this rank's heads. q, k, v come in as [T, heads * head_dim] (k already
    rotated); the output goes out the same way, ready for the row-parallel output projection.

    `alibi_slopes` are for all heads; this rank keeps its own. `sinks`: the layer has learned per-head sink
    logits (gpt-oss), a float32 parameter `sinks` of this rank's heads, loaded from the checkpoint."""

    def __init__(self, backend, layer_index: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logit_softcap: float | None = None,
                 alibi_slopes: torch.Tensor | None = None, tp=None, sinks: bool = False):
        super().__init__()
        rank, n = rank_and_size(tp)
        self.backend, self.layer_index = backend, layer_index
        self.rank, self.tp_size = rank, n
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads // n, num_kv_heads // n, head_dim
        if alibi_slopes is not None:
            alibi_slopes = alibi_slopes[rank * self.num_heads:(rank + 1) * self.num_heads].float()
        self.sinks = None
        if sinks:  # float32 whatever the model dtype: the kernels read sink logits as float32
            self.sinks = torch.nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32), requires_grad=False)
            self.sinks.weight_loader = self._load_sinks
        self.params = AttentionParams(scale=scale, sliding_window=sliding_window, logit_softcap=logit_softcap,
                                      alibi_slopes=alibi_slopes, sinks=self.sinks)

    def _load_sinks(self, param, ckpt, shard_id=None) -> None:
        n = self.num_heads
        if tuple(ckpt.shape) != (n * self.tp_size,):
            raise ValueError(f"{ckpt.where}: tensor {ckpt.name} has shape {tuple(ckpt.shape)}, expected "
                             f"({n * self.tp_size},) = num_attention_heads (from config.json)")
        param.data.copy_(ckpt.narrow(0, self.rank * n, n))

    def to_device(self, device: torch.device) -> None:
        if self.params.alibi_slopes is not None:
            self.params = dataclasses.replace(self.params, alibi_slopes=self.params.alibi_slopes.to(device))

    def set_kv_scales(self, k_scale: float, v_scale: float) -> None:
        """The fp8 KV pool's scales for this layer (attention/kv_quant.py)."""
        self.params = dataclasses.replace(self.params, k_scale=k_scale, v_scale=v_scale)

    def applies_qkv_scales(self, rotary, kv_cache: torch.Tensor | None, dtype: torch.dtype) -> bool:
        """Whether forward() can take q, k, v as an FP8 GEMM's unscaled output (qkv_scales) at no extra pass: the
        rotary + cache-write kernel applies the scales where the backend runs it, the rotary is one it turns and
        the cache is in the model's dtype (an fp8 pool is written by reshape_and_cache instead)."""
        return (rotary is not None and getattr(self.backend, "fuses_rotary_cache", False) and rotary.fusable()
                and kv_cache is not None and kv_cache.dtype == dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta,
                rotary=None, positions: torch.Tensor | None = None, qkv_scales=None, quant_for=None):
        """`rotary` (a RotaryEmbedding, with the tokens' `positions`): q and k are turned first; where the backend
        writes the cache itself and q, k, v are one fused qkv's rows, by one kernel that also writes the turned k
        and v into the cache (kernels/rotary.py, rotary_and_cache: a launch and a read of k fewer per layer).
        `qkv_scales` (float32 row [T, 1], column [1, q + k + v widths]): q, k, v are an FP8 GEMM's unscaled output
        (quantization/fp8.py's FP8Output), scaled by that kernel, else here first. `quant_for`: the linear layer
        that alone reads the output; where it takes FP8 input and the backend's decode kernel can quantize for it,
        an FP8Input is returned (a launch fewer per layer), else the output."""
        written = False
        if rotary is not None and getattr(self.backend, "fuses_rotary_cache", False) and rotary.fusable():
            from kernels.rotary import rotary_and_cache

            cos, sin = rotary.cos_sin(positions)
            written = rotary_and_cache(q, k, v, cos, sin, kv_cache, meta.slot_mapping, self.head_dim,
                                       scales=qkv_scales)
        if not written:
            if qkv_scales is not None:
                q, k, v = scale_parts((q, k, v), *qkv_scales)
            if rotary is not None:
                q, k = rotary(positions, q, k)
        T, d = q.shape[0], self.head_dim
        extra = {"cache_written": True} if written else {}
        if quant_for is not None and getattr(self.backend, "quantizes_output", False):
            from services.engine.model.quantization import fp8

            if fp8.ATTENTION_QUANT and fp8.takes_fp8_input(quant_for, T):
                extra["fp8_out"] = (quant_for.method.scale_ub,)
        o = self.backend.forward(q.reshape(T, self.num_heads, d), k.reshape(T, self.num_kv_heads, d),
                                 v.reshape(T, self.num_kv_heads, d), kv_cache, meta, self.params, **extra)
        if isinstance(o, tuple):
            from services.engine.model.quantization.fp8 import FP8Input

            return FP8Input(o[1], o[2])
        return o.reshape(T, self.num_heads * d)


def scale_parts(parts, row: torch.Tensor, col: torch.Tensor) -> list[torch.Tensor]:
    """Side-by-side column parts of an FP8 GEMM's unscaled output, each scaled as FP8Output.dense() scales it."""
    out, at = [], 0
    for p in parts:
        out.append((p.float() * row * col[:, at:at + p.shape[-1]]).to(p.dtype))
        at += p.shape[-1]
    return out


def layer_sliding_window(cfg, layer: int) -> int | None:
    """The sliding window of layer `layer`: HF's `layer_types` when given ("sliding_attention" layers use
    `sliding_window`), else `sliding_window` for every layer unless `use_sliding_window` is false (or, with
    `max_window_layers`, for the layers from that index on, as HF 4 read Qwen2 configs)."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types:
        if len(types) != cfg.num_hidden_layers:
            raise ValueError(f"{cfg.source}: field 'layer_types' has {len(types)} entries, expected "
                             f"num_hidden_layers = {cfg.num_hidden_layers}")
        return window if types[layer] == "sliding_attention" else None
    use = cfg.hf.get("use_sliding_window")
    if use is False:
        return None
    if use and cfg.get("max_window_layers") is not None:  # HF 4 Qwen2 / Qwen3: the layers from there on slide
        return window if layer >= cfg.get("max_window_layers") else None
    return window
