"""OLMoE: the Llama layout (pre-norm) with RMSNorm over all of q and all of k before rotary (as OLMo 2), optional
clamping of q/k/v after those norms (clip_qkv), and 64-expert softmax top-8 routing (renormalised only when
norm_topk_prob)."""

from __future__ import annotations

from services.engine.model.layers.moe import MoESpec
from services.engine.model.layers.norm import RMSNorm
from services.engine.model.mixtral import LlamaMoEForCausalLM


class OlmoeForCausalLM(LlamaMoEForCausalLM):
    experts_keys = ("num_experts", "num_local_experts")
    qk_norm_per_head = False

    def __init__(self, cfg, backend, tp=None):
        self.clip_qkv = cfg.get("clip_qkv")
        super().__init__(cfg, backend, tp)

    def moe_spec(self, cfg, experts_key):
        return MoESpec.from_config(cfg, experts_key, self.inter_key, renormalize=bool(cfg.get("norm_topk_prob", False)))

    def make_qk_norms(self):
        c = self.cfg
        return (RMSNorm(c.num_attention_heads * c.head_dim, self.eps, tp=self.tp, tp_sharded=True),
                RMSNorm(c.num_key_value_heads * c.head_dim, self.eps, tp=self.tp, tp_sharded=True))
