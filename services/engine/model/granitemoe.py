"""GraniteMoE: Granite's multipliers (embedding, residual, attention, logits scaling; read by the Llama class)
with a mixture of experts whose router takes the top-k logits and softmaxes over them, and whose experts are
stored stacked: input_linear [E, 2I, H] (gate rows, then up rows) and output_linear [E, H, I].
GraniteMoeShared adds an ungated shared MLP every token passes through (shared_mlp: input_linear holds its gate
and up rows, output_linear its down projection), summed with the experts' output."""

from __future__ import annotations

from services.engine.model.layers.moe import MoESpec
from services.engine.model.mixtral import LlamaMoEForCausalLM


class GraniteMoeForCausalLM(LlamaMoEForCausalLM):
    checkpoint_renames = ((".block_sparse_moe.input_linear.weight", ".mlp.experts.w13_weight"),
                          (".block_sparse_moe.output_linear.weight", ".mlp.experts.w2_weight"),
                          (".block_sparse_moe.router.layer.", ".mlp.gate."))

    def moe_spec(self, cfg, experts_key):
        return MoESpec.from_config(cfg, experts_key, self.inter_key, routing="topk_softmax")


class GraniteMoeSharedForCausalLM(GraniteMoeForCausalLM):
    checkpoint_renames = GraniteMoeForCausalLM.checkpoint_renames + (
        (".shared_mlp.input_linear.", ".mlp.shared_expert.gate_up_proj."),
        (".shared_mlp.output_linear.", ".mlp.shared_expert.down_proj."))

    def moe_spec(self, cfg, experts_key):
        return MoESpec.from_config(cfg, experts_key, self.inter_key, routing="topk_softmax",
                                   shared_intermediate_size=cfg.get("shared_intermediate_size", 0),
                                   shared_field="shared_intermediate_size")
