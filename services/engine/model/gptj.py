"""GPT-J: one LayerNorm feeds attention and the MLP in parallel (both added to the residual), separate
bias-free q/k/v projections, GPT-J (interleaved) rotary on the first `rotary_dim` features of each head,
GELU-new MLP with biases, untied LM head with a bias."""

from __future__ import annotations

import torch

from services.engine.model.base import CausalLM
from services.engine.model.gpt2 import GPT2_NAMES, GPTAttention, tie_default
from services.engine.model.layers.embedding import LogitsProcessor, ParallelLMHead, VocabParallelEmbedding
from services.engine.model.layers.mlp import DenseMLP
from services.engine.model.layers.norm import LayerNorm
from services.engine.model.layers.rotary import RotaryEmbedding

STACKED_QKV = ((".qkv_proj.", ".q_proj.", "q"), (".qkv_proj.", ".k_proj.", "k"), (".qkv_proj.", ".v_proj.", "v"))


class GPTJBlock(torch.nn.Module):
    def __init__(self, m: "GPTJForCausalLM", i: int):
        super().__init__()
        cfg = m.cfg
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.get("layer_norm_epsilon", 1e-5))
        self.attn = GPTAttention(m, i, "qkv_proj", "out_proj", qkv_bias=False, out_bias=False, rotary=m.rotary)
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.get("activation_function", "gelu_new"),
                            tp=m.tp, names=("fc_in", "fc_out"), source=cfg.source)

    def forward(self, positions, h, kv_cache, meta):
        x = self.ln_1(h)
        return h + self.attn(positions, x, kv_cache, meta) + self.mlp(x)


class GPTJModel(torch.nn.Module):
    def __init__(self, m: "GPTJForCausalLM"):
        super().__init__()
        cfg = m.cfg
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, m.tp)
        self.h = torch.nn.ModuleList(GPTJBlock(m, i) for i in range(cfg.num_hidden_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.get("layer_norm_epsilon", 1e-5))


class GPTJForCausalLM(CausalLM):
    config_aliases = GPT2_NAMES
    stacked_params = STACKED_QKV
    skip_tensors = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")

    @classmethod
    def make_config(cls, hf, source):
        return tie_default(cls, hf, source, default=False)

    def __init__(self, cfg, backend, tp=None):
        super().__init__(cfg, backend, tp)
        self.rotary = RotaryEmbedding(cfg, cfg.head_dim, {"rope_type": "default", "rope_theta": 10000.0},
                                      is_neox=False, rotary_dim=cfg.get("rotary_dim") or cfg.head_dim)
        self.transformer = GPTJModel(self)
        self.final_norm = self.transformer.ln_f
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, bias=not cfg.tie_word_embeddings,
                                      tie_to=self.transformer.wte if cfg.tie_word_embeddings else None)
        self.logits_processor = LogitsProcessor(cfg.vocab_size, tp=tp)

    def run(self, input_ids, positions, kv_caches, meta):
        h = self.transformer.wte(input_ids)
        for i, block in enumerate(self.transformer.h):
            h = block(positions, h, kv_caches[i], meta)
        return h
