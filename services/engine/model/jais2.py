"""Jais 2 (transformers' native `jais2`): the Llama block order with LayerNorms (with bias), q/k/v/o biases,
an ungated MLP (up_proj / down_proj) with squared-ReLU, NeoX rotary, untied LM head."""

from __future__ import annotations

import torch

from services.engine.model.gpt2 import GPTAttention
from services.engine.model.layers.mlp import DenseMLP
from services.engine.model.starcoder2 import LayerNormDecoderLM


class Jais2DecoderLayer(torch.nn.Module):
    def __init__(self, m: "Jais2ForCausalLM", i: int):
        super().__init__()
        cfg = m.cfg
        bias = cfg.get("attention_bias", True)
        self.input_layernorm = m.make_norm()
        self.self_attn = GPTAttention(m, i, "qkv_proj", "o_proj", qkv_bias=bias, out_bias=bias, rotary=m.rotary)
        self.post_attention_layernorm = m.make_norm()
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.get("hidden_act", "relu2"),
                            bias=cfg.get("mlp_bias", True), tp=m.tp, names=("up_proj", "down_proj"), source=cfg.source)

    def forward(self, positions, h, kv_cache, meta):
        h = h + self.self_attn(positions, self.input_layernorm(h), kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class Jais2ForCausalLM(LayerNormDecoderLM):
    def make_layer(self, i):
        return Jais2DecoderLayer(self, i)
