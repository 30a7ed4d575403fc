"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a flat batch of tokens and a paged KV cache.

A step's tokens from all sequences are concatenated ([num_tokens, hidden]); attention is the only
place that knows about sequences, through the backend and its AttentionMetadata. q/k/v and
gate/up projections are fused into one matmul each at load time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.engine.attention.metadata import AttentionMetadata
from services.engine.attention.params import AttentionParams


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: dict | None = None
    model_type: str = "llama"

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        heads = cfg["num_attention_heads"]
        mt = cfg.get("model_type", "llama")
        rope_params = cfg.get("rope_parameters") or {}
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta") or rope_params.get("rope_theta", 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", mt == "qwen2"),
            rope_scaling=cfg.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None),
            model_type=mt,
        )


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "llama3":
        factor = sc["factor"]
        low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_ctx = sc.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv = inv / sc["factor"]
    elif kind not in ("default", None):
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return inv


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As HF does: normalise in float32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, H, D]; cos/sin [T, 1, D] (both halves repeated, HF's rotate_half convention)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaModel(torch.nn.Module):
    def __init__(self, cfg: LlamaConfig, attention_backend, dtype: torch.dtype, device: torch.device, tp=None):
        super().__init__()
        self.cfg = cfg
        self.attn = attention_backend
        self.dtype = dtype
        self.device = device
        self.attn_params = AttentionParams(scale=cfg.head_dim ** -0.5)
        self.weights: dict[str, torch.Tensor] = {}
        self.inv_freq = rope_inv_freq(cfg).to(device)
        # Triton elementwise kernels on GPU (kernels/fused_norm.py, rotary.py, silu_mul.py); the rotary
        # kernel needs a power-of-two half head size.
        half = cfg.head_dim // 2
        self.fused_elementwise = device.type == "cuda" and half >= 1 and (half & (half - 1)) == 0
        # Tensor parallelism (services/engine/parallel.py): None on one device. Otherwise this rank holds
        # its share of the heads, FFN and vocabulary (model/sharding.py) and the group all-reduces.
        self.tp = tp
        n = tp.world_size if tp is not None else 1
        self.num_heads = cfg.num_attention_heads // n
        self.num_kv_heads = cfg.num_key_value_heads // n
        self.vocab_shard = -(-cfg.vocab_size // n)
        self.vocab_start = tp.rank * self.vocab_shard if tp is not None else 0

    # Loading -----------------------------------------------------------------------------------
    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        cfg, w = self.cfg, {}
        if self.tp is not None:
            from services.engine.model.sharding import shard_checkpoint

            tensors = shard_checkpoint(tensors, cfg, self.tp.rank, self.tp.world_size)

        def get(name):
            # pop: each source tensor is dropped as soon as it is placed, so peak memory stays near one copy
            if name not in tensors:
                raise ValueError(f"model: weight {name} missing from the checkpoint")
            return tensors.pop(name).to(device=self.device, dtype=self.dtype)

        w["embed"] = get("model.embed_tokens.weight")
        w["norm"] = get("model.norm.weight")
        if "lm_head.weight" in tensors and not cfg.tie_word_embeddings:
            w["lm_head"] = get("lm_head.weight")
        else:
            w["lm_head"] = w["embed"]
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            w[f"{i}.qkv"] = torch.cat([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"], 0)
            if cfg.attention_bias:
                w[f"{i}.qkv_bias"] = torch.cat([get(p + f"self_attn.{x}_proj.bias") for x in "qkv"], 0)
            w[f"{i}.o"] = get(p + "self_attn.o_proj.weight")
            w[f"{i}.gate_up"] = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")], 0)
            w[f"{i}.down"] = get(p + "mlp.down_proj.weight")
            w[f"{i}.ln1"] = get(p + "input_layernorm.weight")
            w[f"{i}.ln2"] = get(p + "post_attention_layernorm.weight")
        self.weights = w

    # Forward ------------------------------------------------------------------------------------
    def rope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden] (before the last norm)."""
        if self.fused_elementwise:
            return self._forward_fused(input_ids, positions, kv_caches, meta)
        cfg, w, tp = self.cfg, self.weights, self.tp
        T = input_ids.shape[0]
        hq, hkv, d = self.num_heads, self.num_kv_heads, cfg.head_dim
        q_size, kv_size = hq * d, hkv * d
        cos, sin = self.rope_cos_sin(positions)
        h = F.embedding(input_ids, w["embed"]) if tp is None else self._embed_vocab_parallel(input_ids)
        for i in range(cfg.num_hidden_layers):
            x = rms_norm(h, w[f"{i}.ln1"], cfg.rms_norm_eps)
            qkv = F.linear(x, w[f"{i}.qkv"], w.get(f"{i}.qkv_bias"))
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = apply_rope(q.view(T, hq, d), cos, sin)
            k = apply_rope(k.view(T, hkv, d), cos, sin)
            o = self.attn.forward(q, k, v.view(T, hkv, d), kv_caches[i], meta, self.attn_params)
            o = F.linear(o.reshape(T, q_size), w[f"{i}.o"])
            h = h + (o if tp is None else tp.all_reduce(o))  # row-parallel: sum the ranks' partial outputs
            x = rms_norm(h, w[f"{i}.ln2"], cfg.rms_norm_eps)
            gate, up = F.linear(x, w[f"{i}.gate_up"]).chunk(2, dim=-1)
            down = F.linear(F.silu(gate) * up, w[f"{i}.down"])
            h = h + (down if tp is None else tp.all_reduce(down))
        return h

    def _forward_fused(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                       meta: AttentionMetadata) -> torch.Tensor:
        """The same computation with Triton kernels for the elementwise parts (GPU): residual add +
        RMSNorm in one kernel, rotary in place on the fused qkv, SwiGLU in one kernel. A decode step
        launches ~5 kernels per layer this way instead of ~40."""
        from kernels.fused_norm import add_rms_norm
        from kernels.rotary import rotary_inplace
        from kernels.silu_mul import silu_mul

        cfg, w, tp = self.cfg, self.weights, self.tp
        T = input_ids.shape[0]
        hq, hkv, d = self.num_heads, self.num_kv_heads, cfg.head_dim
        q_size, kv_size = hq * d, hkv * d
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        h = F.embedding(input_ids, w["embed"]) if tp is None else self._embed_vocab_parallel(input_ids)
        residual = None
        eps = cfg.rms_norm_eps
        for i in range(cfg.num_hidden_layers):
            if residual is None:
                residual = h
                x = add_rms_norm(h, None, w[f"{i}.ln1"], eps)
            else:
                x = add_rms_norm(h, residual, w[f"{i}.ln1"], eps)  # residual += h (the last MLP output)
            qkv = F.linear(x, w[f"{i}.qkv"], w.get(f"{i}.qkv_bias"))
            rotary_inplace(qkv, cos, sin, hq, hkv, d)
            q = qkv[:, :q_size].view(T, hq, d)
            k = qkv[:, q_size:q_size + kv_size].view(T, hkv, d)
            v = qkv[:, q_size + kv_size:].view(T, hkv, d)
            o = F.linear(self.attn.forward(q, k, v, kv_caches[i], meta, self.attn_params).reshape(T, q_size), w[f"{i}.o"])
            x = add_rms_norm(o if tp is None else tp.all_reduce(o), residual, w[f"{i}.ln2"], eps)
            h = F.linear(silu_mul(F.linear(x, w[f"{i}.gate_up"])), w[f"{i}.down"])
            if tp is not None:
                h = tp.all_reduce(h)
        return residual + h

    def _embed_vocab_parallel(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Each rank looks up the ids in its vocabulary slice, zeros the rest; the sum over ranks is exact.
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_shard)
        x = F.embedding(local.masked_fill(outside, 0), self.weights["embed"])
        return self.tp.all_reduce(x.masked_fill(outside[:, None], 0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on the selected rows, in float32 for sampling and logprobs."""
        x = rms_norm(hidden, self.weights["norm"], self.cfg.rms_norm_eps)
        logits = F.linear(x, self.weights["lm_head"])
        if self.tp is not None:  # each rank has its vocabulary slice: gather them, drop the padding
            logits = self.tp.all_gather_columns(logits)[:, :self.cfg.vocab_size]
        return logits.float()
