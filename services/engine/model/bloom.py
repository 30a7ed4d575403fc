"""BLOOM: ALiBi position biases (no position embeddings), a LayerNorm right after the word embeddings, fused
q/k/v stored per head [q, k, v] (regrouped at load), LayerNorm and linear biases, GELU (tanh) MLP, optional
residual taken after the norm (apply_residual_connection_post_layernorm), tied LM head."""

from __future__ import annotations

import torch

from services.engine.model.base import CausalLM
from services.engine.model.gpt2 import GPTAttention, tie_default
from services.engine.model.layers.attention import alibi_slopes
from services.engine.model.layers.embedding import LogitsProcessor, ParallelLMHead, VocabParallelEmbedding
from services.engine.model.layers.linear import per_head_qkv_to_blocks
from services.engine.model.layers.mlp import DenseMLP
from services.engine.model.layers.norm import LayerNorm


class BloomBlock(torch.nn.Module):
    def __init__(self, m: "BloomForCausalLM", i: int):
        super().__init__()
        cfg = m.cfg
        h = cfg.hidden_size
        self.post_ln_residual = cfg.get("apply_residual_connection_post_layernorm", False)
        self.input_layernorm = LayerNorm(h, m.eps)
        self.self_attention = GPTAttention(m, i, "query_key_value", "dense",
                                           alibi_slopes=alibi_slopes(cfg.num_attention_heads))
        self.post_attention_layernorm = LayerNorm(h, m.eps)
        # BLOOM's GELU is the tanh approximation written out (Megatron's bias_gelu).
        self.mlp = DenseMLP(h, cfg.intermediate_size, "gelu_fast", tp=m.tp, names=("dense_h_to_4h", "dense_4h_to_h"))

    def forward(self, positions, h, kv_cache, meta):
        x = self.input_layernorm(h)
        h = (x if self.post_ln_residual else h) + self.self_attention(positions, x, kv_cache, meta)
        x = self.post_attention_layernorm(h)
        return (x if self.post_ln_residual else h) + self.mlp(x)


class BloomModel(torch.nn.Module):
    def __init__(self, m: "BloomForCausalLM"):
        super().__init__()
        cfg = m.cfg
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, m.tp)
        self.word_embeddings_layernorm = LayerNorm(cfg.hidden_size, m.eps)
        self.h = torch.nn.ModuleList(BloomBlock(m, i) for i in range(cfg.num_hidden_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, m.eps)


class BloomForCausalLM(CausalLM):
    config_aliases = {"hidden_size": ("n_embed",), "num_hidden_layers": ("n_layer",),
                      "num_attention_heads": ("n_head",)}

    @classmethod
    def make_config(cls, hf, source):
        return tie_default(cls, hf, source)

    def __init__(self, cfg, backend, tp=None):
        super().__init__(cfg, backend, tp)
        self.eps = cfg.get("layer_norm_epsilon", 1e-5)
        self.transformer = BloomModel(self)
        self.final_norm = self.transformer.ln_f
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp,
                                      tie_to=self.transformer.word_embeddings if cfg.tie_word_embeddings else None)
        self.logits_processor = LogitsProcessor(cfg.vocab_size, tp=tp)

    def checkpoint_name(self, name):
        return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name  # older: no prefix

    def adapt_tensor(self, name, t):
        if ".query_key_value." in name:
            h, d = self.cfg.num_attention_heads, self.cfg.head_dim
            return t.mapped(lambda x: per_head_qkv_to_blocks(x, h, d))
        return t

    def run(self, input_ids, positions, kv_caches, meta):
        h = self.transformer.word_embeddings_layernorm(self.transformer.word_embeddings(input_ids))
        for i, block in enumerate(self.transformer.h):
            h = block(positions, h, kv_caches[i], meta)
        return h
