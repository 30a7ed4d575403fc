"""MPT: ALiBi with MPT's own slopes (1 / 2^(8k / n) over the next power of two n, interleaved for other head
counts), no position embeddings, bias-free LayerNorms and linears, fused Wqkv ([q; k; v]) optionally
clamped (clip_qkv), GELU MLP of 4 * d_model, tied LM head."""

from __future__ import annotations

import math

import torch

from services.engine.model.base import CausalLM
from services.engine.model.gpt2 import GPTAttention, tie_default
from services.engine.model.layers.embedding import LogitsProcessor, ParallelLMHead, VocabParallelEmbedding
from services.engine.model.layers.mlp import DenseMLP
from services.engine.model.layers.norm import LayerNorm


def mpt_alibi_slopes(num_heads: int, bias_max: float = 8.0) -> torch.Tensor:
    n = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / torch.pow(2, torch.arange(1, n + 1, dtype=torch.int64).float() * (bias_max / n))
    if n != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


class MptBlock(torch.nn.Module):
    def __init__(self, m: "MptForCausalLM", i: int):
        super().__init__()
        cfg, ac = m.cfg, m.attn_config
        h, eps, bias = cfg.hidden_size, cfg.get("layer_norm_epsilon", 1e-5), not cfg.get("no_bias", True)
        self.norm_1 = LayerNorm(h, eps, bias=bias)
        slopes = mpt_alibi_slopes(cfg.num_attention_heads, ac.get("alibi_bias_max") or 8)
        self.attn = GPTAttention(m, i, "Wqkv", "out_proj", qkv_bias=bias, out_bias=bias,
                                 scale=ac.get("softmax_scale"), alibi_slopes=slopes, clip_qkv=ac.get("clip_qkv"))
        self.norm_2 = LayerNorm(h, eps, bias=bias)
        self.ffn = DenseMLP(h, cfg.intermediate_size, "gelu", bias=bias, tp=m.tp, names=("up_proj", "down_proj"))

    def forward(self, positions, h, kv_cache, meta):
        h = h + self.attn(positions, self.norm_1(h), kv_cache, meta)
        return h + self.ffn(self.norm_2(h))


class MptModel(torch.nn.Module):
    def __init__(self, m: "MptForCausalLM"):
        super().__init__()
        cfg = m.cfg
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, m.tp)
        self.blocks = torch.nn.ModuleList(MptBlock(m, i) for i in range(cfg.num_hidden_layers))
        self.norm_f = LayerNorm(cfg.hidden_size, cfg.get("layer_norm_epsilon", 1e-5), bias=not cfg.get("no_bias", True))


class MptForCausalLM(CausalLM):
    config_aliases = {"hidden_size": ("d_model",), "num_attention_heads": ("n_heads",), "num_hidden_layers": ("n_layers",),
                      "max_position_embeddings": ("max_seq_len",)}

    @classmethod
    def make_config(cls, hf, source):
        cfg = tie_default(cls, hf, source)
        cfg.intermediate_size = 4 * cfg.hidden_size  # as transformers builds it (every MPT has expansion_ratio 4)
        return cfg

    def __init__(self, cfg, backend, tp=None):
        super().__init__(cfg, backend, tp)
        self.attn_config = cfg.get("attn_config") or {}
        self.transformer = MptModel(self)
        self.final_norm = self.transformer.norm_f
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp,
                                      tie_to=self.transformer.wte if cfg.tie_word_embeddings else None)
        self.logits_processor = LogitsProcessor(cfg.vocab_size, tp=tp)

    def run(self, input_ids, positions, kv_caches, meta):
        h = self.transformer.wte(input_ids)
        for i, block in enumerate(self.transformer.blocks):
            h = block(positions, h, kv_caches[i], meta)
        return h
