"""Falcon, both decoder layouts. Old (7B, 1B): multi-query (one K/V head; q heads, then k, then v in
query_key_value) or per-head [q, k, v] without multi_query, attention and MLP in parallel from one LayerNorm
(parallel_attn) or in sequence. New (40B, 180B; new_decoder_architecture): grouped K/V heads stored per group
[q heads..., k, v] (regrouped at load), ln_attn and ln_mlp feeding attention and MLP in parallel (or one
input_layernorm with num_ln_in_parallel_attn = 1). NeoX rotary, GELU MLP, tied LM head. ALiBi Falcons
(alibi: true, Falcon-RW) are refused."""

from __future__ import annotations

import torch

from services.engine.model.base import CausalLM
from services.engine.model.gpt2 import GPTAttention, tie_default
from services.engine.model.layers.embedding import LogitsProcessor, ParallelLMHead, VocabParallelEmbedding
from services.engine.model.layers.linear import per_head_qkv_to_blocks
from services.engine.model.layers.mlp import DenseMLP
from services.engine.model.layers.norm import LayerNorm
from services.engine.model.layers.rotary import RotaryEmbedding, rope_parameters


class FalconDecoderLayer(torch.nn.Module):
    def __init__(self, m: "FalconForCausalLM", i: int):
        super().__init__()
        cfg = m.cfg
        h, eps, bias = cfg.hidden_size, cfg.get("layer_norm_epsilon", 1e-5), cfg.get("bias", False)
        self.new, self.parallel = m.new_arch, cfg.get("parallel_attn", True)
        self.two_norms = self.new and (cfg.get("num_ln_in_parallel_attn") or 2) == 2
        self.self_attention = GPTAttention(m, i, "query_key_value", "dense", qkv_bias=bias, out_bias=bias,
                                           rotary=m.rotary)
        self.mlp = DenseMLP(h, cfg.intermediate_size, cfg.get("activation", "gelu"), bias=bias, tp=m.tp,
                            names=("dense_h_to_4h", "dense_4h_to_h"), source=cfg.source)
        if self.two_norms:
            self.ln_attn, self.ln_mlp = LayerNorm(h, eps), LayerNorm(h, eps)
        else:
            self.input_layernorm = LayerNorm(h, eps)
            if not self.new and not self.parallel:
                self.post_attention_layernorm = LayerNorm(h, eps)

    def forward(self, positions, h, kv_cache, meta):
        if self.two_norms:
            return h + self.self_attention(positions, self.ln_attn(h), kv_cache, meta) + self.mlp(self.ln_mlp(h))
        x = self.input_layernorm(h)
        a = self.self_attention(positions, x, kv_cache, meta)
        if self.new or self.parallel:
            return h + a + self.mlp(x)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))


class FalconModel(torch.nn.Module):
    def __init__(self, m: "FalconForCausalLM"):
        super().__init__()
        cfg = m.cfg
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, m.tp)
        self.h = torch.nn.ModuleList(FalconDecoderLayer(m, i) for i in range(cfg.num_hidden_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.get("layer_norm_epsilon", 1e-5))


class FalconForCausalLM(CausalLM):
    config_aliases = {"num_hidden_layers": ("n_layer",), "num_attention_heads": ("n_head",),
                      "intermediate_size": ("ffn_hidden_size",)}

    @classmethod
    def make_config(cls, hf, source):
        if hf.get("alibi"):
            raise ValueError(f"{source}: Falcon with alibi: true (Falcon-RW) is not supported; Folio serves the "
                             f"rotary Falcons (alibi: false)")
        cfg = tie_default(cls, hf, source, mha=False)
        heads = cfg.num_attention_heads
        if hf.get("new_decoder_architecture"):
            kv = hf.get("num_kv_heads") or heads
        else:
            kv = 1 if hf.get("multi_query", True) else (hf.get("num_kv_heads") or heads)
        if heads % kv:
            raise ValueError(f"{source}: num_attention_heads ({heads}) must be a multiple of num_kv_heads ({kv})")
        cfg.num_key_value_heads = kv
        return cfg

    def __init__(self, cfg, backend, tp=None):
        super().__init__(cfg, backend, tp)
        self.new_arch = bool(cfg.get("new_decoder_architecture", False))
        self.rotary = RotaryEmbedding(cfg, cfg.head_dim, rope_parameters(cfg))
        self.transformer = FalconModel(self)
        self.final_norm = self.transformer.ln_f
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp,
                                      tie_to=self.transformer.word_embeddings if cfg.tie_word_embeddings else None)
        self.logits_processor = LogitsProcessor(cfg.vocab_size, tp=tp)

    def adapt_tensor(self, name, t):
        c = self.cfg
        if ".query_key_value." in name and c.num_key_value_heads != 1:
            # per group [q heads..., k, v]: groups = KV heads (new layout) or heads (old, one q per group)
            groups, d = c.num_key_value_heads, c.head_dim
            return t.mapped(lambda x: per_head_qkv_to_blocks(x, groups, d))
        return t

    def run(self, input_ids, positions, kv_caches, meta):
        h = self.transformer.word_embeddings(input_ids)
        for i, layer in enumerate(self.transformer.h):
            h = layer(positions, h, kv_caches[i], meta)
        return h
