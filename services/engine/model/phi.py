"""Phi (1, 1.5, 2): one LayerNorm feeds attention and the MLP in parallel, q/k/v and `dense` with biases,
NeoX rotary on part of each head (partial_rotary_factor), optional per-head LayerNorm on q and k
(qk_layernorm, shared over heads), GELU-new MLP (fc1 / fc2), final_layernorm, LM head with a bias."""

from __future__ import annotations

import torch

from services.engine.model.gpt2 import GPTAttention
from services.engine.model.layers.mlp import DenseMLP
from services.engine.model.layers.norm import LayerNorm
from services.engine.model.starcoder2 import LayerNormDecoderLM


class PhiDecoderLayer(torch.nn.Module):
    def __init__(self, m: "PhiForCausalLM", i: int):
        super().__init__()
        cfg = m.cfg
        self.input_layernorm = m.make_norm()
        self.self_attn = GPTAttention(m, i, "qkv_proj", "dense", rotary=m.rotary)
        if cfg.get("qk_layernorm", False):
            self.self_attn.q_norm = LayerNorm(cfg.head_dim, m.eps)
            self.self_attn.k_norm = LayerNorm(cfg.head_dim, m.eps)
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.get("hidden_act", "gelu_new"), tp=m.tp,
                            names=("fc1", "fc2"), source=cfg.source)

    def forward(self, positions, h, kv_cache, meta):
        x = self.input_layernorm(h)
        return h + self.self_attn(positions, x, kv_cache, meta) + self.mlp(x)


class PhiForCausalLM(LayerNormDecoderLM):
    final_norm_name = "final_layernorm"
    lm_head_bias = True
    checkpoint_renames = ((".q_layernorm.", ".q_norm."), (".k_layernorm.", ".k_norm."))

    def make_layer(self, i):
        return PhiDecoderLayer(self, i)
