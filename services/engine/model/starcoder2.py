"""Starcoder2: the Llama block order with LayerNorms (with bias), q/k/v/o and MLP biases (use_bias), a plain
GELU-tanh MLP (c_fc / c_proj), GQA, sliding-window attention on every layer, tied LM head. Also
`LayerNormDecoderLM`, the `model.embed_tokens / model.layers / model.norm` skeleton that Phi, StableLM,
OLMo and Jais2 share with it."""

from __future__ import annotations

import torch

from services.engine.model.base import CausalLM
from services.engine.model.gpt2 import GPTAttention
from services.engine.model.gptj import STACKED_QKV
from services.engine.model.layers.attention import layer_sliding_window
from services.engine.model.layers.embedding import LogitsProcessor, ParallelLMHead, VocabParallelEmbedding
from services.engine.model.layers.mlp import DenseMLP
from services.engine.model.layers.norm import LayerNorm
from services.engine.model.layers.rotary import RotaryEmbedding, rope_parameters


class DecoderStack(torch.nn.Module):
    def __init__(self, m: "LayerNormDecoderLM", norm_name: str):
        super().__init__()
        cfg = m.cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, m.tp)
        self.layers = torch.nn.ModuleList(m.make_layer(i) for i in range(cfg.num_hidden_layers))
        setattr(self, norm_name, m.make_norm())


class LayerNormDecoderLM(CausalLM):
    """embed_tokens -> layers -> final norm -> lm_head, under `model.`; the family gives the layer and norm."""
    stacked_params = STACKED_QKV
    final_norm_name = "norm"
    lm_head_bias = False
    eps_key: str | None = "layer_norm_eps"
    """config.json's LayerNorm epsilon field (None: the family fixes it at 1e-5)."""
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    """(checkpoint substring, Folio substring) pairs applied to every tensor name."""

    def __init__(self, cfg, backend, tp=None):
        self.eps = cfg.get(self.eps_key, 1e-5) if self.eps_key else 1e-5
        super().__init__(cfg, backend, tp)
        self.rotary = RotaryEmbedding(cfg, cfg.head_dim, rope_parameters(cfg))
        self.model = DecoderStack(self, self.final_norm_name)
        self.final_norm = getattr(self.model, self.final_norm_name)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, bias=self.lm_head_bias,
                                      tie_to=self.model.embed_tokens if cfg.tie_word_embeddings else None)
        self.logits_processor = LogitsProcessor(cfg.vocab_size, tp=tp)

    def checkpoint_name(self, name):
        for old, new in self.checkpoint_renames:
            name = name.replace(old, new)
        return name

    def make_layer(self, i: int) -> torch.nn.Module:
        raise NotImplementedError

    def make_norm(self) -> torch.nn.Module:
        return LayerNorm(self.cfg.hidden_size, self.eps)

    def run(self, input_ids, positions, kv_caches, meta):
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            h = layer(positions, h, kv_caches[i], meta)
        return h


class Starcoder2DecoderLayer(torch.nn.Module):
    def __init__(self, m: "Starcoder2ForCausalLM", i: int):
        super().__init__()
        cfg = m.cfg
        bias = cfg.get("use_bias", True)
        self.input_layernorm = m.make_norm()
        self.self_attn = GPTAttention(m, i, "qkv_proj", "o_proj", qkv_bias=bias, out_bias=bias, rotary=m.rotary,
                                      sliding_window=layer_sliding_window(cfg, i))
        self.post_attention_layernorm = m.make_norm()
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.get("hidden_act", "gelu_pytorch_tanh"),
                            bias=bias, tp=m.tp, names=("c_fc", "c_proj"), source=cfg.source)

    def forward(self, positions, h, kv_cache, meta):
        h = h + self.self_attn(positions, self.input_layernorm(h), kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class Starcoder2ForCausalLM(LayerNormDecoderLM):
    @classmethod
    def make_config(cls, hf, source):
        cfg = super().make_config(hf, source)
        cfg.tie_word_embeddings = bool(hf.get("tie_word_embeddings", True))
        return cfg

    eps_key = "norm_epsilon"

    def make_layer(self, i):
        return Starcoder2DecoderLayer(self, i)
