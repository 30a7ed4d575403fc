"""GPT-NeoX (Pythia, GPT-NeoX-20B): parallel residual (x + attn(ln1(x)) + mlp(ln2(x))) or sequential, fused
q/k/v stored per head [q, k, v] (regrouped at load), NeoX rotary on part of each head (rotary_pct), LayerNorm
and linear biases, GELU MLP, untied LM head (`embed_out` in older checkpoints)."""

from __future__ import annotations

import torch

from services.engine.model.base import CausalLM
from services.engine.model.gpt2 import GPTAttention, tie_default
from services.engine.model.layers.embedding import LogitsProcessor, ParallelLMHead, VocabParallelEmbedding
from services.engine.model.layers.linear import per_head_qkv_to_blocks
from services.engine.model.layers.mlp import DenseMLP
from services.engine.model.layers.norm import LayerNorm
from services.engine.model.layers.rotary import RotaryEmbedding, rope_parameters


def neox_rope(cfg) -> dict:
    """rope_parameters, reading older config.json's rotary_pct / rotary_emb_base (Pythia) when present."""
    params = rope_parameters(cfg)
    if cfg.get("rotary_pct") is not None and "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = cfg.get("rotary_pct")
    if cfg.get("rotary_emb_base") is not None and cfg.get("rope_theta") is None and not cfg.get("rope_parameters"):
        params["rope_theta"] = cfg.get("rotary_emb_base")
    return params


class GPTNeoXLayer(torch.nn.Module):
    def __init__(self, m: "GPTNeoXForCausalLM", i: int):
        super().__init__()
        cfg = m.cfg
        h, eps = cfg.hidden_size, cfg.get("layer_norm_eps", 1e-5)
        self.parallel = cfg.get("use_parallel_residual", True)
        self.input_layernorm = LayerNorm(h, eps)
        self.post_attention_layernorm = LayerNorm(h, eps)
        bias = cfg.get("attention_bias", True)
        self.attention = GPTAttention(m, i, "query_key_value", "dense", qkv_bias=bias, out_bias=bias,
                                      rotary=m.rotary)
        self.mlp = DenseMLP(h, cfg.intermediate_size, cfg.get("hidden_act", "gelu"), tp=m.tp,
                            names=("dense_h_to_4h", "dense_4h_to_h"), source=cfg.source)

    def forward(self, positions, h, kv_cache, meta):
        a = self.attention(positions, self.input_layernorm(h), kv_cache, meta)
        if self.parallel:
            return h + a + self.mlp(self.post_attention_layernorm(h))
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))


class GPTNeoXModel(torch.nn.Module):
    def __init__(self, m: "GPTNeoXForCausalLM"):
        super().__init__()
        cfg = m.cfg
        self.embed_in = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, m.tp)
        self.layers = torch.nn.ModuleList(GPTNeoXLayer(m, i) for i in range(cfg.num_hidden_layers))
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.get("layer_norm_eps", 1e-5))


class GPTNeoXForCausalLM(CausalLM):
    skip_tensors = ("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")

    @classmethod
    def make_config(cls, hf, source):
        return tie_default(cls, hf, source, default=False)

    def __init__(self, cfg, backend, tp=None):
        super().__init__(cfg, backend, tp)
        self.rotary = RotaryEmbedding(cfg, cfg.head_dim, neox_rope(cfg))
        self.gpt_neox = GPTNeoXModel(self)
        self.final_norm = self.gpt_neox.final_layer_norm
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp,
                                      tie_to=self.gpt_neox.embed_in if cfg.tie_word_embeddings else None)
        self.logits_processor = LogitsProcessor(cfg.vocab_size, tp=tp)

    def checkpoint_name(self, name):
        return "lm_head.weight" if name == "embed_out.weight" else name

    def adapt_tensor(self, name, t):
        if ".query_key_value." in name:
            h, d = self.cfg.num_attention_heads, self.cfg.head_dim
            return t.mapped(lambda x: per_head_qkv_to_blocks(x, h, d))
        return t

    def run(self, input_ids, positions, kv_caches, meta):
        h = self.gpt_neox.embed_in(input_ids)
        for i, layer in enumerate(self.gpt_neox.layers):
            h = layer(positions, h, kv_caches[i], meta)
        return h
