"""GraniteMoE: Granite's multipliers (embedding, residual, attention, logits scaling; read by the Llama class)
with a mixture of experts whose router takes the top-k logits and softmaxes over them, and whose experts are
stored stacked: input_linear [E, 2I, H] (gate rows, then up rows) and output_linear [E, H, I]."""

from __future__ import annotations

from services.engine.model.layers.moe import MoESpec
from services.engine.model.mixtral import LlamaMoEForCausalLM


class GraniteMoeForCausalLM(LlamaMoEForCausalLM):
    checkpoint_renames = ((".block_sparse_moe.input_linear.weight", ".mlp.experts.w13_weight"),
                          (".block_sparse_moe.output_linear.weight", ".mlp.experts.w2_weight"),
                          (".block_sparse_moe.router.layer.", ".mlp.gate."))

    def moe_spec(self, cfg, experts_key):
        return MoESpec.from_config(cfg, experts_key, self.inter_key, routing="topk_softmax")
