"""PhiMoE (Phi-3.5-MoE): the Llama layout with LayerNorms (weight and bias; eps from rms_norm_eps), q/k/v/o
biases (attention_bias), an LM head bias (lm_head_bias), and sparsemixer top-2 routing (layers/moe.py)."""

from __future__ import annotations

from services.engine.model.layers.moe import MoESpec
from services.engine.model.layers.norm import LayerNorm
from services.engine.model.mixtral import LlamaMoEForCausalLM


class PhimoeForCausalLM(LlamaMoEForCausalLM):
    checkpoint_renames = ((".block_sparse_moe.", ".mlp."),)

    def moe_spec(self, cfg, experts_key):
        return MoESpec.from_config(cfg, experts_key, self.inter_key, routing="sparsemixer",
                                   jitter_eps=float(cfg.get("router_jitter_noise", 0.01)))

    def make_norm(self):
        return LayerNorm(self.cfg.hidden_size, self.eps)
