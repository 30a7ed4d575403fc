"""gpt-oss: the Llama layout with q/k/v/o biases, a learned sink logit per attention head, sliding and full
attention layers alternating (layer_types), YaRN rotary; experts with biases and a clamped SwiGLU
((up + 1) * gate * sigmoid(alpha * gate), gate <= limit, |up| <= limit), routed by a softmax over the top-k
router logits (router with a bias). Experts are stored stacked and transposed, gate and up interleaved
column by column: gate_up_proj [E, H, 2I], down_proj [E, I, H]; they are regrouped at load.

The released checkpoints store experts in MXFP4 (`quantization_config.quant_method = "mxfp4"`): refused with
a message; bf16 conversions (e.g. transformers' dequantized save) load."""

from __future__ import annotations

import torch

from services.engine.model.layers.moe import MoESpec, restacked
from services.engine.model.mixtral import LlamaMoEForCausalLM


def _halves(t: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] with gate and up rows interleaved -> gate rows, then up rows."""
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)


class GptOssForCausalLM(LlamaMoEForCausalLM):
    attention_sinks = True
    checkpoint_renames = ((".self_attn.sinks", ".self_attn.attn.sinks"), (".mlp.router.", ".mlp.gate."),
                          (".experts.gate_up_proj_bias", ".experts.w13_bias"),
                          (".experts.gate_up_proj", ".experts.w13_weight"),
                          (".experts.down_proj_bias", ".experts.w2_bias"),
                          (".experts.down_proj", ".experts.w2_weight"))

    @classmethod
    def make_config(cls, hf, source):
        q = hf.get("quantization_config")
        if isinstance(q, dict) and q.get("quant_method") == "mxfp4":
            raise ValueError(f"{source}: field 'quantization_config' says MXFP4 experts (gpt-oss's released "
                             f"format), which Folio does not run; use a bf16 copy (transformers can write one: "
                             f"from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True)) then "
                             f"save_pretrained)")
        return super().make_config(hf, source)

    def moe_spec(self, cfg, experts_key):
        # The released config.json carries both num_experts_per_tok and the original experts_per_token.
        top_k_key = "num_experts_per_tok" if cfg.get("num_experts_per_tok") is not None else "experts_per_token"
        return MoESpec.from_config(cfg, experts_key, self.inter_key, top_k_key, routing="topk_softmax",
                                   activation="swiglu_oai",
                                   expert_bias=True, router_bias=True,
                                   swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
                                   swiglu_limit=float(cfg.get("swiglu_limit", 7.0)))

    def adapt_tensor(self, name, t):
        if name.endswith(".experts.w13_weight") and len(t.shape) == 3:
            E, H, two_i = t.shape
            return restacked(t, (E, two_i, H), lambda x: _halves(x.transpose(1, 2)))
        if name.endswith(".experts.w13_bias") and len(t.shape) == 2:
            return restacked(t, t.shape, _halves)
        if name.endswith(".experts.w2_weight") and len(t.shape) == 3:
            E, inter, H = t.shape
            return restacked(t, (E, H, inter), lambda x: x.transpose(1, 2))
        return t
