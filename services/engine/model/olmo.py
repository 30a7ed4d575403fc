"""OLMo (v1): the Llama layout with parameter-free LayerNorms (no weight, no bias, eps 1e-5), optional
clamping of q, k and v (clip_qkv), SwiGLU MLP, NeoX rotary."""

from __future__ import annotations

import torch

from services.engine.model.gpt2 import GPTAttention
from services.engine.model.layers.norm import LayerNorm
from services.engine.model.llama import STACKED_QKV_GATE_UP, LlamaMLP
from services.engine.model.starcoder2 import LayerNormDecoderLM


class OlmoDecoderLayer(torch.nn.Module):
    def __init__(self, m: "OlmoForCausalLM", i: int):
        super().__init__()
        cfg = m.cfg
        bias = cfg.get("attention_bias", False)
        self.input_layernorm = m.make_norm()
        self.self_attn = GPTAttention(m, i, "qkv_proj", "o_proj", qkv_bias=bias, out_bias=bias, rotary=m.rotary,
                                      clip_qkv=cfg.get("clip_qkv"))
        self.post_attention_layernorm = m.make_norm()
        self.mlp = LlamaMLP(m)

    def forward(self, positions, h, kv_cache, meta):
        h = h + self.self_attn(positions, self.input_layernorm(h), kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class OlmoForCausalLM(LayerNormDecoderLM):
    stacked_params = STACKED_QKV_GATE_UP
    mlp_bias = False

    eps_key = None  # OLMo's LayerNorm has no parameters and a fixed epsilon

    def make_norm(self):
        return LayerNorm(self.cfg.hidden_size, self.eps, affine=False)

    def make_layer(self, i):
        return OlmoDecoderLayer(self, i)
