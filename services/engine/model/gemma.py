"""Gemma family: Gemma (1), Gemma 2 and Gemma 3 (text). Gemma's RMSNorm scales by (1 + w), embeddings are
multiplied by sqrt(hidden), the MLP is GELU(tanh)-and-mul. Gemma 2 adds a norm after attention and after
the MLP, attention logit soft-capping, a final logit soft-cap, query_pre_attn_scalar and alternating
sliding-window layers; Gemma 3 drops the attention soft-cap for per-head q/k norms and gives its local
(sliding) layers their own rope base.
"""

from __future__ import annotations

import torch

from services.engine.model.base import CausalLM
from services.engine.model.layers.activation import ActAndMul
from services.engine.model.layers.attention import Attention
from services.engine.model.layers.embedding import LogitsProcessor, ParallelLMHead, VocabParallelEmbedding
from services.engine.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from services.engine.model.layers.norm import RMSNorm
from services.engine.model.layers.rotary import RotaryEmbedding, rope_parameters
from services.engine.model.llama import STACKED_QKV_GATE_UP


def layer_types(cfg) -> list[str]:
    """HF's `layer_types`, or the pattern older config.json files imply (Gemma 2: every other layer slides;
    Gemma 3: five sliding layers, then one global)."""
    n = cfg.num_hidden_layers
    types = cfg.get("layer_types")
    if types:
        if len(types) != n:
            raise ValueError(f"{cfg.source}: field 'layer_types' has {len(types)} entries, expected {n}")
        return list(types)
    if cfg.model_type == "gemma":
        return ["full_attention"] * n
    if cfg.model_type == "gemma2":
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def gemma_rope(cfg, layer_type: str) -> dict:
    params = rope_parameters(cfg, layer_type)
    if layer_type == "sliding_attention" and not isinstance((cfg.get("rope_parameters") or {}).get(layer_type), dict):
        # HF 4 configs: local layers use rope_local_base_freq, unscaled.
        params = {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
    return params


class GemmaAttention(torch.nn.Module):
    def __init__(self, m: "GemmaForCausalLM", i: int):
        super().__init__()
        cfg, tp = m.cfg, m.tp
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        bias = bool(cfg.get("attention_bias", False))
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, hq, hkv, bias=bias, tp=tp)
        self.o_proj = RowParallelLinear(hq * d, cfg.hidden_size, bias=bias, tp=tp, what="attention heads")
        kind = m.layer_types[i]
        self.q_norm = RMSNorm(d, m.eps, gemma=True) if m.qk_norm else None
        self.k_norm = RMSNorm(d, m.eps, gemma=True) if m.qk_norm else None
        self.rotary_emb = m.rotaries[kind]
        window = cfg.get("sliding_window") if kind == "sliding_attention" else None
        scale = cfg.get("query_pre_attn_scalar", d) ** -0.5
        self.attn = Attention(m.backend, i, hq, hkv, d, scale, window, cfg.get("attn_logit_softcapping"), tp=tp)

    def forward(self, positions, h, kv_cache, meta):
        q, k, v = self.qkv_proj.split_qkv(self.qkv_proj(h))
        if self.q_norm is not None:
            T, d = q.shape[0], self.attn.head_dim
            q = self.q_norm(q.reshape(T, -1, d)).reshape(T, -1)
            k = self.k_norm(k.reshape(T, -1, d)).reshape(T, -1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class GemmaMLP(torch.nn.Module):
    def __init__(self, m: "GemmaForCausalLM"):
        super().__init__()
        cfg = m.cfg
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act == "gelu":  # legacy Gemma 1 value that always meant the tanh approximation (as HF reads it)
            act = "gelu_pytorch_tanh"
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, tp=m.tp,
                                                       what="intermediate_size")
        self.act = ActAndMul(act, cfg.source)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp=m.tp, what="intermediate_size")

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class GemmaDecoderLayer(torch.nn.Module):
    def __init__(self, m: "GemmaForCausalLM", i: int):
        super().__init__()
        h = m.cfg.hidden_size
        self.input_layernorm = RMSNorm(h, m.eps, gemma=True)
        self.self_attn = GemmaAttention(m, i)
        self.post_attention_layernorm = RMSNorm(h, m.eps, gemma=True)
        self.mlp = GemmaMLP(m)
        self.sandwich = m.sandwich_norms
        if self.sandwich:  # Gemma 2/3: post_attention_layernorm normalises the attention output instead
            self.pre_feedforward_layernorm = RMSNorm(h, m.eps, gemma=True)
            self.post_feedforward_layernorm = RMSNorm(h, m.eps, gemma=True)

    def forward(self, positions, h, kv_cache, meta):
        a = self.self_attn(positions, self.input_layernorm(h), kv_cache, meta)
        if self.sandwich:
            h = h + self.post_attention_layernorm(a)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))


class GemmaModel(torch.nn.Module):
    def __init__(self, m: "GemmaForCausalLM"):
        super().__init__()
        cfg = m.cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, m.tp)
        self.layers = torch.nn.ModuleList(GemmaDecoderLayer(m, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, m.eps, gemma=True)


class GemmaForCausalLM(CausalLM):
    stacked_params = STACKED_QKV_GATE_UP
    sandwich_norms = False
    qk_norm = False

    def __init__(self, cfg, backend, tp=None):
        super().__init__(cfg, backend, tp)
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.layer_types = layer_types(cfg)
        self.rotaries = torch.nn.ModuleDict({kind: RotaryEmbedding(cfg, cfg.head_dim, gemma_rope(cfg, kind))
                                             for kind in sorted(set(self.layer_types))})
        self.model = GemmaModel(self)
        self.final_norm = self.model.norm
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp,
                                      tie_to=self.model.embed_tokens if cfg.get("tie_word_embeddings", True) else None)
        self.logits_processor = LogitsProcessor(cfg.vocab_size, soft_cap=cfg.get("final_logit_softcapping"), tp=tp)

    @classmethod
    def make_config(cls, hf, source):
        cfg = super().make_config(hf, source)
        cfg.tie_word_embeddings = bool(hf.get("tie_word_embeddings", True))  # Gemma ties unless told otherwise
        return cfg

    def run(self, input_ids, positions, kv_caches, meta):
        h = self.model.embed_tokens(input_ids)
        h = h * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=h.dtype)  # rounded to the model dtype, as HF
        for i, layer in enumerate(self.model.layers):
            h = layer(positions, h, kv_caches[i], meta)
        return h


class Gemma2ForCausalLM(GemmaForCausalLM):
    sandwich_norms = True


class Gemma3ForCausalLM(GemmaForCausalLM):
    sandwich_norms = True
    qk_norm = True
