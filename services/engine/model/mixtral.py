"""Mixtral, and `LlamaMoEForCausalLM`, the Llama layout with a sparse mixture-of-experts block in place of
the MLP that Qwen2/Qwen3-MoE, OLMoE, PhiMoE, GraniteMoE and gpt-oss build on: each family says where its
config.json keeps the expert count and size, how its router picks (layers/moe.py `MoESpec`), and how its
checkpoint names the block's tensors."""

from __future__ import annotations

from services.engine.model.layers.moe import MoESpec, SparseMoeBlock, expert_target
from services.engine.model.llama import LlamaForCausalLM, LlamaMLP


class LlamaMoEForCausalLM(LlamaForCausalLM):
    experts_keys: tuple[str, ...] = ("num_local_experts",)
    """config.json's expert count, first present of these (transformers 5 renamed some)."""
    inter_key = "intermediate_size"
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    """(checkpoint substring, Folio substring), applied in order to every tensor name."""

    @classmethod
    def make_config(cls, hf, source):
        q = hf.get("quantization_config")
        if q:
            method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
            raise ValueError(f"{source}: field 'quantization_config' ({method}): quantized mixture-of-experts "
                             f"checkpoints are not supported; use the model's bf16 / fp16 release (docs/moe.md)")
        return super().make_config(hf, source)

    def __init__(self, cfg, backend, tp=None):
        key = next((k for k in self.experts_keys if cfg.get(k) is not None), self.experts_keys[0])
        self.moe = self.moe_spec(cfg, key)
        super().__init__(cfg, backend, tp)

    def moe_spec(self, cfg, experts_key: str) -> MoESpec:
        return MoESpec.from_config(cfg, experts_key, self.inter_key)

    def is_moe_layer(self, i: int) -> bool:
        return True

    def make_mlp(self, i):
        return SparseMoeBlock(self.cfg.hidden_size, self.moe, self.tp) if self.is_moe_layer(i) else LlamaMLP(self)

    def checkpoint_name(self, name):
        for old, new in self.checkpoint_renames:
            name = name.replace(old, new)
        return name

    def param_target(self, name):
        return expert_target(name) or super().param_target(name)


class MixtralForCausalLM(LlamaMoEForCausalLM):
    """Softmax over the experts, top-k renormalised; experts w1 (gate), w3 (up), w2 (down)."""
    checkpoint_renames = ((".block_sparse_moe.", ".mlp."),)
