"""config.json's `architectures` name -> the class that builds it (one file per family), and the refusals."""

from __future__ import annotations

import importlib

# architecture -> (module under services/engine/model, class)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),  # also Yi, Llama 2/3.x, SmolLM2
    "AquilaForCausalLM": ("llama", "LlamaForCausalLM"),  # Aquila / Aquila2: Llama layout
    "AquilaModel": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
    "GraniteForCausalLM": ("llama", "LlamaForCausalLM"),  # multipliers read from config.json
    "SmolLM3ForCausalLM": ("llama", "LlamaForCausalLM"),  # no_rope_layers
    "InternLM3ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Phi3ForCausalLM": ("llama", "LlamaForCausalLM"),  # Phi-3, Phi-4: pre-fused qkv / gate_up, longrope
    "Olmo2ForCausalLM": ("olmo2", "Olmo2ForCausalLM"),
    "CohereForCausalLM": ("cohere", "CohereForCausalLM"),
    "GlmForCausalLM": ("glm", "GlmForCausalLM"),
    "Glm4ForCausalLM": ("glm", "Glm4ForCausalLM"),
    "GemmaForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma", "Gemma3ForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "GPTBigCodeForCausalLM": ("gpt_bigcode", "GPTBigCodeForCausalLM"),
    "GPTJForCausalLM": ("gptj", "GPTJForCausalLM"),
    "GPTNeoXForCausalLM": ("gpt_neox", "GPTNeoXForCausalLM"),
    "OPTForCausalLM": ("opt", "OPTForCausalLM"),
    "BloomForCausalLM": ("bloom", "BloomForCausalLM"),
    "FalconForCausalLM": ("falcon", "FalconForCausalLM"),
    "MptForCausalLM": ("mpt", "MptForCausalLM"),
    "MPTForCausalLM": ("mpt", "MptForCausalLM"),  # the name mosaicml's own config.json files carry
    "PhiForCausalLM": ("phi", "PhiForCausalLM"),
    "StableLmForCausalLM": ("stablelm", "StableLmForCausalLM"),
    "Starcoder2ForCausalLM": ("starcoder2", "Starcoder2ForCausalLM"),
    "OlmoForCausalLM": ("olmo", "OlmoForCausalLM"),
    "Jais2ForCausalLM": ("jais2", "Jais2ForCausalLM"),
    # Mixtures of experts (layers/moe.py, kernels/fused_moe.py; docs/moe.md)
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen_moe", "Qwen3MoeForCausalLM"),
    "OlmoeForCausalLM": ("olmoe", "OlmoeForCausalLM"),
    "PhimoeForCausalLM": ("phimoe", "PhimoeForCausalLM"),
    "GraniteMoeForCausalLM": ("granitemoe", "GraniteMoeForCausalLM"),
    "GraniteMoeSharedForCausalLM": ("granitemoe", "GraniteMoeSharedForCausalLM"),
    "GptOssForCausalLM": ("gpt_oss", "GptOssForCausalLM"),
}

# Architectures whose modelling code lives only in the checkpoint's repository (trust_remote_code):
# Folio runs no code from a model directory, and transformers has no reference to test against.
REMOTE_CODE_ONLY: dict[str, str] = {
    "BaichuanForCausalLM": "Baichuan",
    "BaiChuanForCausalLM": "Baichuan",
    "DeciLMForCausalLM": "DeciLM",
    "OrionForCausalLM": "Orion",
    "JAISLMHeadModel": "Jais (1; Jais 2 is native: Jais2ForCausalLM)",
}


def model_class(hf: dict, source: str = "config.json"):
    """The class for this config.json, or a ValueError that says why not."""
    archs = hf.get("architectures")
    if not archs or not isinstance(archs, list):
        raise ValueError(f"{source}: field 'architectures' is missing (expected e.g. [\"LlamaForCausalLM\"])")
    arch = archs[0]
    if arch in REMOTE_CODE_ONLY:
        raise ValueError(
            f"{source}: architecture {arch} ({REMOTE_CODE_ONLY[arch]}) is implemented only by code shipped inside the "
            f"checkpoint (trust_remote_code); Folio does not run code from model directories (docs/models.md)")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{source}: architecture {arch} is not supported (supported: {sorted(ARCHITECTURES)})")
    module, cls = ARCHITECTURES[arch]
    return getattr(importlib.import_module(f"services.engine.model.{module}"), cls)


def model_config(hf: dict, source: str = "config.json"):
    """The checked ModelConfig of this config.json (as its architecture reads it)."""
    return model_class(hf, source).make_config(hf, source)


def build_model(hf: dict, backend, dtype, device, tp=None, source: str = "config.json", quantization: str | None = None):
    """Construct the architecture's model on `device` in `dtype` with empty weights (load them next).
    `quantization` overrides config.json's quantization_config (services/engine/model/quantization)."""
    import contextlib

    import torch

    from services.engine.model.base import build_context
    from services.engine.model.layers.linear import deferred_weights
    from services.engine.model.quantization import apply_quantization, get_quant_config

    cls = model_class(hf, source)
    cfg = cls.make_config(hf, source)
    qcfg = get_quant_config(hf, quantization, source)
    if qcfg is not None:
        qcfg.check_device(torch.device(device))
    with build_context(dtype, device), (deferred_weights() if qcfg is not None else contextlib.nullcontext()):
        model = cls(cfg, backend, tp)
        if qcfg is not None:
            apply_quantization(model, qcfg)
    model.quant_config = qcfg
    model.finish(device, fused_elementwise=torch.device(device).type == "cuda")
    return model
