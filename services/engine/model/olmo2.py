"""OLMo 2: the Llama layout with the norms moved after each block (post_attention_layernorm on the attention
output, post_feedforward_layernorm on the MLP output; no input norms) and RMSNorm over all of q and all
of k before rotary (under tensor parallelism that norm's mean square is all-reduced)."""

from __future__ import annotations

import torch

from services.engine.model.layers.norm import RMSNorm
from services.engine.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class Olmo2DecoderLayer(torch.nn.Module):
    def __init__(self, m: "Olmo2ForCausalLM", i: int):
        super().__init__()
        h = m.cfg.hidden_size
        self.self_attn = LlamaAttention(m, i)
        self.post_attention_layernorm = RMSNorm(h, m.eps, scale_in_float32=True)
        self.mlp = LlamaMLP(m)
        self.post_feedforward_layernorm = RMSNorm(h, m.eps, scale_in_float32=True)

    def forward(self, positions, h, residual, kv_cache, meta):
        h = h + self.post_attention_layernorm(self.self_attn(positions, h, kv_cache, meta))
        return h + self.post_feedforward_layernorm(self.mlp(h)), None


class Olmo2ForCausalLM(LlamaForCausalLM):
    qk_norm_per_head = False

    def __init__(self, cfg, backend, tp=None):
        super().__init__(cfg, backend, tp)
        self.model.norm = self.final_norm = RMSNorm(cfg.hidden_size, self.eps, scale_in_float32=True)

    def make_layer(self, i):
        return Olmo2DecoderLayer(self, i)

    def make_qk_norms(self):
        c = self.cfg
        return (RMSNorm(c.num_attention_heads * c.head_dim, self.eps, tp=self.tp, tp_sharded=True, scale_in_float32=True),
                RMSNorm(c.num_key_value_heads * c.head_dim, self.eps, tp=self.tp, tp_sharded=True, scale_in_float32=True))

    def run(self, input_ids, positions, kv_caches, meta):
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            h, _ = layer(positions, h, None, kv_caches[i], meta)
        return h
