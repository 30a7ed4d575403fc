"""Cohere Command-R: one LayerNorm (no bias) feeds attention and the MLP in parallel, whose outputs are both
added to the residual; GPT-J (interleaved) rotary; optional per-head LayerNorm on q and k (Command-R+);
logits multiplied by logit_scale; tied embeddings."""

from __future__ import annotations

import torch

from services.engine.model.layers.embedding import LogitsProcessor
from services.engine.model.layers.norm import LayerNorm
from services.engine.model.layers.rotary import RotaryEmbedding, rope_parameters
from services.engine.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class CohereDecoderLayer(torch.nn.Module):
    def __init__(self, m: "CohereForCausalLM", i: int):
        super().__init__()
        self.input_layernorm = LayerNorm(m.cfg.hidden_size, m.eps, bias=False)
        self.self_attn = LlamaAttention(m, i)
        self.mlp = LlamaMLP(m)

    def forward(self, positions, h, residual, kv_cache, meta):
        x = self.input_layernorm(h)
        return h + self.self_attn(positions, x, kv_cache, meta) + self.mlp(x), None


class CohereForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_config(cls, hf, source):
        cfg = super().make_config(hf, source)
        cfg.tie_word_embeddings = bool(hf.get("tie_word_embeddings", True))
        return cfg

    def __init__(self, cfg, backend, tp=None):
        super().__init__(cfg, backend, tp)
        self.model.norm = self.final_norm = LayerNorm(cfg.hidden_size, self.eps, bias=False)
        self.logits_processor = LogitsProcessor(cfg.vocab_size, cfg.get("logit_scale", 1.0), tp=tp)

    def make_layer(self, i):
        return CohereDecoderLayer(self, i)

    def make_rotary(self):
        return RotaryEmbedding(self.cfg, self.cfg.head_dim, rope_parameters(self.cfg), is_neox=False)

    def make_qk_norms(self):
        if not self.cfg.get("use_qk_norm", False):
            return None, None
        c = self.cfg
        return (LayerNorm((c.num_attention_heads, c.head_dim), self.eps, bias=False, tp=self.tp),
                LayerNorm((c.num_key_value_heads, c.head_dim), self.eps, bias=False, tp=self.tp))

    def run(self, input_ids, positions, kv_caches, meta):
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            h, _ = layer(positions, h, None, kv_caches[i], meta)
        return h
