"""GLM (glm-4-9b-hf layout) and GLM-4 (0414): the Llama layout with GPT-J (interleaved) rotary on the first
half of each head (partial_rotary_factor 0.5), q/k/v biases, a pre-fused gate_up_proj in the checkpoint;
GLM-4 adds a norm on the attention output and on the MLP output before each residual add."""

from __future__ import annotations

import torch

from services.engine.model.layers.norm import RMSNorm
from services.engine.model.layers.rotary import RotaryEmbedding, rope_parameters
from services.engine.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class GlmForCausalLM(LlamaForCausalLM):
    o_proj_bias = False

    def make_rotary(self):
        return RotaryEmbedding(self.cfg, self.cfg.head_dim, rope_parameters(self.cfg), is_neox=False)


class Glm4DecoderLayer(torch.nn.Module):
    def __init__(self, m: "Glm4ForCausalLM", i: int):
        super().__init__()
        h = m.cfg.hidden_size
        self.input_layernorm = RMSNorm(h, m.eps)
        self.self_attn = LlamaAttention(m, i)
        self.post_self_attn_layernorm = RMSNorm(h, m.eps)
        self.post_attention_layernorm = RMSNorm(h, m.eps)
        self.mlp = LlamaMLP(m)
        self.post_mlp_layernorm = RMSNorm(h, m.eps)

    def forward(self, positions, h, residual, kv_cache, meta):
        h = h + self.post_self_attn_layernorm(self.self_attn(positions, self.input_layernorm(h), kv_cache, meta))
        return h + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(h))), None


class Glm4ForCausalLM(GlmForCausalLM):
    def make_layer(self, i):
        return Glm4DecoderLayer(self, i)

    def run(self, input_ids, positions, kv_caches, meta):
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            h, _ = layer(positions, h, None, kv_caches[i], meta)
        return h
