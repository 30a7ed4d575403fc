"""Llama layout and its close relatives (Llama 1-3, Yi, Aquila, Mistral, Qwen2, Qwen3, Granite, SmolLM3,
InternLM3, Phi-3): pre-norm RMSNorm blocks, fused q/k/v and gate/up, NeoX rotary, SwiGLU MLP.

The relatives differ by a few switches, each read from config.json in `LlamaForCausalLM.__init__`:
biases, per-head q/k RMSNorm (Qwen3), layers without rotary (SmolLM3), Granite's multipliers,
sliding windows (Mistral, Qwen2), pre-fused qkv / gate_up tensors in the checkpoint (Phi-3).
"""

from __future__ import annotations

import torch

from services.engine.model.base import CausalLM
from services.engine.model.layers.activation import ActAndMul
from services.engine.model.layers.attention import Attention, layer_sliding_window
from services.engine.model.layers.embedding import LogitsProcessor, ParallelLMHead, VocabParallelEmbedding
from services.engine.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from services.engine.model.layers.norm import RMSNorm
from services.engine.model.layers.rotary import RotaryEmbedding, rope_parameters
from services.engine.model.quantization.fp8 import FP8Output, dense

STACKED_QKV_GATE_UP = (
    (".qkv_proj.", ".q_proj.", "q"), (".qkv_proj.", ".k_proj.", "k"), (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0), (".gate_up_proj.", ".up_proj.", 1),
)


class LlamaAttention(torch.nn.Module):
    def __init__(self, m: "LlamaForCausalLM", i: int):
        super().__init__()
        cfg, tp = m.cfg, m.tp
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, hq, hkv, bias=m.qkv_bias, tp=tp)
        self.o_proj = RowParallelLinear(hq * d, cfg.hidden_size, bias=m.o_bias, tp=tp, what="attention heads")
        self.q_norm, self.k_norm = m.make_qk_norms()
        self.rotary_emb = m.rotary if m.uses_rope(i) else None
        self.attn = Attention(m.backend, i, hq, hkv, d, m.attention_scale, layer_sliding_window(cfg, i), tp=tp,
                              sinks=m.attention_sinks)
        self.qk_norm_per_head = m.qk_norm_per_head
        self.clip_qkv = m.clip_qkv

    def forward(self, positions, h, kv_cache, meta):
        # FP8 weights: q/k/v may come out unscaled (quantization/fp8.py's FP8Output, cuBLAS's faster tensor-wise
        # GEMM) where the rotary + cache kernel applies the scales; decided per call, as it depends on the pool.
        self.qkv_proj.fp8_deferred_scales = self.q_norm is None and self.clip_qkv is None \
            and self.attn.applies_qkv_scales(self.rotary_emb, kv_cache, self.qkv_proj.params_dtype)
        out, scales = self.qkv_proj(h), None
        if isinstance(out, FP8Output):
            out, scales = out.raw, (out.row, out.col)
        q, k, v = self.qkv_proj.split_qkv(out)
        if self.q_norm is not None:  # before rotary: per head (Qwen3, Cohere) or over all heads (OLMo 2)
            if self.qk_norm_per_head:
                T, d = q.shape[0], self.attn.head_dim
                q = self.q_norm(q.reshape(T, -1, d)).reshape(T, -1)
                k = self.k_norm(k.reshape(T, -1, d)).reshape(T, -1)
            else:
                q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:  # OLMoE: clamp after the q/k norms
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        # The attention layer turns q and k (with the cache write, in one kernel, where it can).
        return self.o_proj(self.attn(q, k, v, kv_cache, meta, rotary=self.rotary_emb, positions=positions,
                                     qkv_scales=scales, quant_for=self.o_proj))


class LlamaMLP(torch.nn.Module):
    def __init__(self, m: "LlamaForCausalLM"):
        super().__init__()
        cfg = m.cfg
        act = cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2,
                                                       bias=m.mlp_bias, tp=m.tp, what="intermediate_size")
        self.act = ActAndMul(act, cfg.source)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=m.mlp_bias, tp=m.tp,
                                           what="intermediate_size")
        self.gate_up_proj.fp8_deferred_scales = True  # its FP8 scales are applied by self.act (quantization/fp8.py)
        self.gate_up_proj.then_act = self.act  # a W4A16 gate/up may do SwiGLU itself (quantization/int4.py)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x), quant_for=self.down_proj))


class LlamaDecoderLayer(torch.nn.Module):
    def __init__(self, m: "LlamaForCausalLM", i: int):
        super().__init__()
        self.input_layernorm = m.make_norm()
        self.self_attn = LlamaAttention(m, i)
        self.post_attention_layernorm = m.make_norm()
        self.mlp = m.make_mlp(i)
        self.residual_multiplier = m.residual_multiplier
        # FP8 scales of the block outputs applied by the next norm. Not the last layer's MLP output: it goes to the
        # plain add in LlamaForCausalLM.run, where dense() would cost four elementwise passes (bench/fp8_where.py
        # round 1: 0.43 ms of an 8,192-token step), more than the scaled GEMM's extra cost.
        self.self_attn.o_proj.fp8_deferred_scales = True
        if isinstance(self.mlp, LlamaMLP):
            self.mlp.down_proj.fp8_deferred_scales = i != m.cfg.num_hidden_layers - 1

    @property
    def mlp_in(self):
        """The dense MLP's input projection (a mixture of experts has none)."""
        return self.mlp.gate_up_proj if isinstance(self.mlp, LlamaMLP) else None

    def forward(self, positions, h, residual, kv_cache, meta):
        """(h, residual) -> (h, residual): the residual add is done by the next norm (fused on GPU)."""
        # The norms quantize for an FP8 projection that alone reads them (qkv; gate_up of a dense MLP).
        qkv = self.self_attn.qkv_proj
        if residual is None:
            residual, x = h, self.input_layernorm(h, quant_for=qkv)
        else:
            x, residual = self.input_layernorm(h, residual, quant_for=qkv)
        h = self.self_attn(positions, x, kv_cache, meta)
        if self.residual_multiplier != 1.0:  # Granite scales each block's output before the add
            h = dense(h) * self.residual_multiplier
        x, residual = self.post_attention_layernorm(h, residual, quant_for=self.mlp_in)
        h = self.mlp(x)
        return (dense(h) * self.residual_multiplier if self.residual_multiplier != 1.0 else h), residual


class LlamaModel(torch.nn.Module):
    def __init__(self, m: "LlamaForCausalLM"):
        super().__init__()
        cfg = m.cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, m.tp)
        self.layers = torch.nn.ModuleList(m.make_layer(i) for i in range(cfg.num_hidden_layers))
        self.norm = m.make_norm()


class LlamaForCausalLM(CausalLM):
    stacked_params = STACKED_QKV_GATE_UP
    qk_norm_per_head = True
    o_proj_bias = True
    """Whether attention_bias also puts a bias on o_proj (Llama: yes; Qwen2, GLM: q/k/v only)."""
    attention_sinks = False
    """A learned sink logit per head (gpt-oss)."""
    clip_qkv: float | None = None

    def __init__(self, cfg, backend, tp=None):
        super().__init__(cfg, backend, tp)
        mt = cfg.model_type
        self.eps = cfg.get("rms_norm_eps", cfg.get("layer_norm_eps", 1e-6))
        bias = bool(cfg.get("attention_bias", cfg.get("qkv_bias", mt == "qwen2")))  # InternLM3 says qkv_bias
        self.qkv_bias, self.o_bias = bias, bias and self.o_proj_bias and mt != "qwen2"
        self.mlp_bias = bool(cfg.get("mlp_bias", cfg.get("bias", False)))  # InternLM3 says bias
        self.attention_scale = cfg.get("attention_multiplier", cfg.head_dim ** -0.5)  # Granite overrides
        self.residual_multiplier = cfg.get("residual_multiplier", 1.0)
        self.embedding_multiplier = cfg.get("embedding_multiplier", 1.0)
        self.rotary = self.make_rotary()
        self.model = LlamaModel(self)
        self.final_norm = self.model.norm
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, bias=bool(cfg.get("lm_head_bias", False)),
                                      tie_to=self.model.embed_tokens if cfg.tie_word_embeddings else None)
        self.logits_processor = LogitsProcessor(cfg.vocab_size, 1.0 / cfg.get("logits_scaling", 1.0), tp=tp)

    def make_layer(self, i: int) -> torch.nn.Module:
        return LlamaDecoderLayer(self, i)

    def make_mlp(self, i: int) -> torch.nn.Module:
        return LlamaMLP(self)

    def make_norm(self) -> torch.nn.Module:
        return RMSNorm(self.cfg.hidden_size, self.eps)

    def make_rotary(self) -> RotaryEmbedding:
        return RotaryEmbedding(self.cfg, self.cfg.head_dim, rope_parameters(self.cfg))

    def make_qk_norms(self) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
        return None, None

    def uses_rope(self, i: int) -> bool:
        no_rope = self.cfg.get("no_rope_layers")  # SmolLM3: 1 = this layer uses rotary, 0 = none
        if no_rope:
            return bool(no_rope[i])
        interval = self.cfg.get("no_rope_layer_interval")  # HF's default pattern when the list is absent
        return (i + 1) % interval != 0 if interval else True

    def run(self, input_ids, positions, kv_caches, meta):
        h = self.model.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            h = h * self.embedding_multiplier
        residual = None
        for i, layer in enumerate(self.model.layers):
            h, residual = layer(positions, h, residual, kv_caches[i], meta)
        return dense(h) + residual


class Qwen3ForCausalLM(LlamaForCausalLM):
    def make_qk_norms(self):
        d = self.cfg.head_dim
        return RMSNorm(d, self.eps), RMSNorm(d, self.eps)
