"""GPT-2: learned absolute positions, pre-norm LayerNorm blocks with biases, fused q/k/v stored as Conv1D
([in, out], read transposed), GELU (tanh) MLP, tied LM head. Also the pieces the other GPT-style
families reuse: `GPTAttention` (q/k/v in one projection, optional rotary / ALiBi / q-k norms / clipping,
modules named as each checkpoint names them) and `tie_default`.
"""

from __future__ import annotations

import torch

from services.engine.model.base import CausalLM
from services.engine.model.config import ModelConfig
from services.engine.model.layers.attention import Attention
from services.engine.model.layers.embedding import (LogitsProcessor, ParallelLMHead, PositionEmbedding,
                                                    VocabParallelEmbedding)
from services.engine.model.layers.linear import QKVParallelLinear, RowParallelLinear
from services.engine.model.layers.mlp import DenseMLP
from services.engine.model.layers.norm import LayerNorm

GPT2_NAMES = {"hidden_size": ("n_embd",), "num_hidden_layers": ("n_layer",), "num_attention_heads": ("n_head",),
              "intermediate_size": ("n_inner",), "max_position_embeddings": ("n_positions",)}


def tie_default(cls, hf: dict, source: str, default: bool = True, mha: bool = True):
    """ModelConfig with tie_word_embeddings defaulting as the family's transformers config class does (GPT-2,
    OPT, BLOOM, Falcon, MPT...: tied unless config.json says otherwise; hub config.json files often omit it).
    `mha`: the family has one K/V head per query head whatever config.json says (transformers ignores a
    stray num_key_value_heads there); families with their own K/V head count set it after."""
    cfg = ModelConfig.from_hf(hf, source, cls.config_aliases)
    cfg.tie_word_embeddings = bool(hf.get("tie_word_embeddings", default))
    if mha:
        cfg.num_key_value_heads = cfg.num_attention_heads
    return cfg


class GPTAttention(torch.nn.Module):
    """q/k/v in one column-parallel projection `qkv_name` (from one fused checkpoint tensor, or stacked from
    q/k/v tensors by `stacked_params`), then attention, then the row-parallel output projection `out_name`."""

    def __init__(self, m: CausalLM, i: int, qkv_name: str, out_name: str, qkv_bias: bool = True,
                 out_bias: bool = True, scale: float | None = None, rotary=None, sliding_window=None,
                 alibi_slopes=None, clip_qkv: float | None = None):
        super().__init__()
        cfg, tp = m.cfg, m.tp
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.qkv_name, self.out_name, self.clip_qkv = qkv_name, out_name, clip_qkv
        setattr(self, qkv_name, QKVParallelLinear(cfg.hidden_size, d, hq, hkv, bias=qkv_bias, tp=tp))
        setattr(self, out_name, RowParallelLinear(hq * d, cfg.hidden_size, bias=out_bias, tp=tp,
                                                  what="attention heads"))
        self.rotary_emb = rotary
        self.q_norm = self.k_norm = None  # per-head norms before rotary (Phi, StableLM); set by the family
        self.attn = Attention(m.backend, i, hq, hkv, d, d ** -0.5 if scale is None else scale, sliding_window,
                              alibi_slopes=alibi_slopes, tp=tp)

    def forward(self, positions, h, kv_cache, meta):
        qkv_proj = getattr(self, self.qkv_name)
        qkv = qkv_proj(h)
        if self.clip_qkv is not None:  # MPT, OLMo: clamp the projections
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv_proj.split_qkv(qkv)
        if self.q_norm is not None:
            T, d = q.shape[0], self.attn.head_dim
            q = self.q_norm(q.reshape(T, -1, d)).reshape(T, -1)
            k = self.k_norm(k.reshape(T, -1, d)).reshape(T, -1)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        return getattr(self, self.out_name)(self.attn(q, k, v, kv_cache, meta))


class GPT2Block(torch.nn.Module):
    def __init__(self, m: "GPT2LMHeadModel", i: int):
        super().__init__()
        cfg = m.cfg
        h, eps = cfg.hidden_size, cfg.get("layer_norm_epsilon", 1e-5)
        scale = cfg.head_dim ** -0.5 if cfg.get("scale_attn_weights", True) else 1.0
        if cfg.get("scale_attn_by_inverse_layer_idx", False):
            scale /= i + 1
        self.ln_1 = LayerNorm(h, eps)
        self.attn = GPTAttention(m, i, "c_attn", "c_proj", scale=scale)
        self.ln_2 = LayerNorm(h, eps)
        self.mlp = DenseMLP(h, cfg.intermediate_size, m.act, tp=m.tp, names=("c_fc", "c_proj"), source=cfg.source)

    def forward(self, positions, h, kv_cache, meta):
        h = h + self.attn(positions, self.ln_1(h), kv_cache, meta)
        return h + self.mlp(self.ln_2(h))


class GPT2Model(torch.nn.Module):
    def __init__(self, m: "GPT2LMHeadModel", block):
        super().__init__()
        cfg = m.cfg
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, m.tp)
        self.wpe = PositionEmbedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = torch.nn.ModuleList(block(m, i) for i in range(cfg.num_hidden_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.get("layer_norm_epsilon", 1e-5))


class GPT2LMHeadModel(CausalLM):
    config_aliases = GPT2_NAMES
    conv1d = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
    """Conv1D weights, stored [in, out]."""
    block = GPT2Block

    @classmethod
    def make_config(cls, hf, source):
        return tie_default(cls, hf, source)

    def __init__(self, cfg, backend, tp=None):
        super().__init__(cfg, backend, tp)
        self.act = cfg.get("activation_function", "gelu_new")
        self.transformer = GPT2Model(self, self.block)
        self.final_norm = self.transformer.ln_f
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp,
                                      tie_to=self.transformer.wte if cfg.tie_word_embeddings else None)
        self.logits_processor = LogitsProcessor(cfg.vocab_size, tp=tp)

    def checkpoint_name(self, name):
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of older checkpoints
            return None
        return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name  # older: no prefix

    def adapt_tensor(self, name, t):
        return t.transposed() if name.endswith(self.conv1d) and len(t.shape) == 2 else t

    def run(self, input_ids, positions, kv_caches, meta):
        h = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for i, block in enumerate(self.transformer.h):
            h = block(positions, h, kv_caches[i], meta)
        return h
