"""StableLM (2, Zephyr, 3B-4E1T): LayerNorm blocks, NeoX rotary on part of each head, optional q/k/v biases
(use_qkv_bias), optional per-head LayerNorms on q and k with a weight per head (qk_layernorm, stored as
`norms.<head>`), SwiGLU MLP, parallel (one norm) or sequential residual, untied LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine.model.gpt2 import GPTAttention
from services.engine.model.layers.norm import LayerNorm
from services.engine.model.layers.parallel_state import rank_and_size
from services.engine.model.llama import STACKED_QKV_GATE_UP, LlamaMLP
from services.engine.model.starcoder2 import LayerNormDecoderLM


class PerHeadLayerNorm(torch.nn.Module):
    """A bias-free LayerNorm per head, each with its own weight; every rank holds all heads' weights (tiny)
    and applies its own heads'."""

    def __init__(self, num_heads: int, head_dim: int, eps: float, tp=None):
        super().__init__()
        rank, n = rank_and_size(tp)
        self.start, self.count, self.eps = rank * (num_heads // n), num_heads // n, eps
        self.norms = torch.nn.ModuleList(LayerNorm(head_dim, eps, bias=False) for _ in range(num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, heads, head_dim]
        w = torch.stack([n.weight for n in self.norms[self.start:self.start + self.count]]).float()
        return (F.layer_norm(x.float(), x.shape[-1:], eps=self.eps) * w).to(x.dtype)


class StableLmDecoderLayer(torch.nn.Module):
    def __init__(self, m: "StableLmForCausalLM", i: int):
        super().__init__()
        cfg = m.cfg
        self.parallel = cfg.get("use_parallel_residual", False)
        self.input_layernorm = m.make_norm()
        self.self_attn = GPTAttention(m, i, "qkv_proj", "o_proj", qkv_bias=cfg.get("use_qkv_bias", False),
                                      out_bias=False, rotary=m.rotary)
        if cfg.get("qk_layernorm", False):
            d = cfg.head_dim
            self.self_attn.q_norm = PerHeadLayerNorm(cfg.num_attention_heads, d, m.eps, m.tp)
            self.self_attn.k_norm = PerHeadLayerNorm(cfg.num_key_value_heads, d, m.eps, m.tp)
        self.mlp = LlamaMLP(m)
        self.post_attention_layernorm = None if self.parallel else m.make_norm()

    def forward(self, positions, h, kv_cache, meta):
        x = self.input_layernorm(h)
        a = self.self_attn(positions, x, kv_cache, meta)
        if self.parallel:
            return h + a + self.mlp(x)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))


class StableLmForCausalLM(LayerNormDecoderLM):
    stacked_params = STACKED_QKV_GATE_UP
    mlp_bias = False
    checkpoint_renames = ((".q_layernorm.", ".q_norm."), (".k_layernorm.", ".k_norm."))

    def make_layer(self, i):
        return StableLmDecoderLayer(self, i)
