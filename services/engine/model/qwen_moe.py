"""Qwen2-MoE and Qwen3-MoE: the Llama layout (Qwen2's q/k/v biases; Qwen3's per-head q/k RMSNorm) with a
mixture of experts on every `decoder_sparse_step`-th layer not in `mlp_only_layers` (the others keep a dense
MLP of intermediate_size). Experts of moe_intermediate_size; top-k renormalised only when norm_topk_prob.
Qwen2-MoE adds a shared expert every token passes through, scaled by sigmoid(shared_expert_gate . x)."""

from __future__ import annotations

from services.engine.model.layers.moe import MoESpec
from services.engine.model.layers.norm import RMSNorm
from services.engine.model.mixtral import LlamaMoEForCausalLM


class Qwen2MoeForCausalLM(LlamaMoEForCausalLM):
    experts_keys = ("num_experts", "num_local_experts")
    inter_key = "moe_intermediate_size"
    o_proj_bias = False

    def moe_spec(self, cfg, experts_key):
        shared = cfg.get("shared_expert_intermediate_size", 0)
        return MoESpec.from_config(cfg, experts_key, self.inter_key, renormalize=bool(cfg.get("norm_topk_prob", False)),
                                   shared_intermediate_size=shared, shared_gate=bool(shared))

    def is_moe_layer(self, i):
        step = self.cfg.get("decoder_sparse_step", 1)
        return i not in (self.cfg.get("mlp_only_layers") or []) and (i + 1) % step == 0


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    o_proj_bias = True  # attention_bias covers o_proj too (false in the released models)

    def moe_spec(self, cfg, experts_key):
        return MoESpec.from_config(cfg, experts_key, self.inter_key, renormalize=bool(cfg.get("norm_topk_prob", False)))

    def make_qk_norms(self):
        d = self.cfg.head_dim
        return RMSNorm(d, self.eps), RMSNorm(d, self.eps)
