"""Which quantization a checkpoint uses (config.json `quantization_config`, or an explicit `quantization=`
override as in vLLM) and the per-layer weight methods it plugs into the linear layers.

One file per scheme: gptq.py, awq.py, compressed_tensors.py, fp8.py (vLLM's `fp8` and `fbgemm_fp8`);
int4.py and fp8.py hold what the 4-bit and FP8 schemes share once loaded. docs/quantization.md has the table.
"""

from __future__ import annotations

from services.engine.model.quantization.base import QuantConfig, apply_quantization

SUPPORTED = ("gptq", "awq", "compressed-tensors", "fp8", "fbgemm_fp8")

# vLLM's kernel-choice names for the same on-disk formats: accepted as the format they read.
ALIASES = {"gptq_marlin": "gptq", "awq_marlin": "awq", "compressed_tensors": "compressed-tensors"}

# Schemes people ask for that Folio refuses, with the reason shown to them.
REFUSED = {
    "bitsandbytes": "bitsandbytes (NF4/int8) stores weights in its own blockwise format with no Folio kernel",
    "gguf": "GGUF k-quants are llama.cpp's format; convert the model to safetensors (docs/quantization.md)",
    "aqlm": "AQLM (additive codebooks) needs codebook kernels Folio does not have",
    "squeezellm": "SqueezeLLM was dropped by vLLM itself (docs/quantization.md)",
    "marlin": "the standalone Marlin format is superseded by GPTQ checkpoints, which Folio reads",
    "hqq": "HQQ has no Folio kernel",
    "eetq": "EETQ has no Folio kernel",
    "exl2": "ExLlamaV2's EXL2 format has no Folio kernel",
    "quip": "QuIP# needs lattice codebook kernels Folio does not have",
    "deepspeedfp": "DeepSpeed FP6/FP8 weights have no Folio kernel",
    "mxfp4": "MXFP4 has no Folio kernel",
    "modelopt": "NVIDIA ModelOpt checkpoints have no Folio loader",
    "torchao": "torchao tensor subclasses are pickled objects, not a tensor format",
    "bitnet": "BitNet ternary weights have no Folio kernel",
    "higgs": "HIGGS has no Folio kernel",
    "vptq": "VPTQ needs codebook kernels Folio does not have",
}


def _config_class(name: str):
    if name == "gptq":
        from services.engine.model.quantization.gptq import GPTQConfig as cls
    elif name == "awq":
        from services.engine.model.quantization.awq import AWQConfig as cls
    elif name == "compressed-tensors":
        from services.engine.model.quantization.compressed_tensors import CompressedTensorsConfig as cls
    elif name == "fp8":
        from services.engine.model.quantization.fp8 import FP8Config as cls
    else:
        from services.engine.model.quantization.fp8 import FBGemmFP8Config as cls
    return cls


def _check_name(name, where: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"{where} must be a string naming the scheme, got {name!r}")
    key = ALIASES.get(name.lower(), name.lower())
    if key in REFUSED:
        raise ValueError(f"{where} {name!r} is not supported: {REFUSED[key]} (supported: {', '.join(SUPPORTED)})")
    if key not in SUPPORTED:
        raise ValueError(f"{where} {name!r} is not a quantization scheme Folio knows (supported: "
                         f"{', '.join(SUPPORTED)}; refused: {', '.join(sorted(REFUSED))})")
    return key


def get_quant_config(hf: dict, override: str | None = None, source: str = "config.json") -> QuantConfig | None:
    """The checkpoint's quantization (None: plain weights). `override` is the user's `quantization=`: it must
    agree with the checkpoint's own scheme, except `fp8` on an unquantized checkpoint (FP8 at load)."""
    qc = hf.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ValueError(f"{source}: field 'quantization_config' must be an object, got {type(qc).__name__}")
    found = _check_name(qc.get("quant_method"), f"{source}: quantization_config.quant_method") if qc else None
    if qc and "quant_method" not in qc:
        raise ValueError(f"{source}: quantization_config has no 'quant_method' (expected one of {SUPPORTED})")
    wanted = _check_name(override, "quantization") if override is not None else None
    if wanted and found and wanted != found:
        raise ValueError(f"quantization={override!r} contradicts {source}, whose quantization_config.quant_method "
                         f"is {qc['quant_method']!r}")
    if wanted and not found:
        if wanted != "fp8":
            raise ValueError(f"quantization={override!r}: {source} has no quantization_config, and Folio quantizes at "
                             f"load only to fp8 (a {wanted} checkpoint must be made by its own tool)")
        return _config_class("fp8").from_config({"quant_method": "fp8", "activation_scheme": "dynamic"}, source,
                                                serialized=False)
    if not found:
        return None
    return _config_class(found).from_config(qc, source)


__all__ = ["QuantConfig", "apply_quantization", "get_quant_config", "SUPPORTED", "REFUSED"]
