"""Find a model (bundled, local HF directory or hub id), read its config, load its safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model: str | None) -> Path:
    """None -> the bundled model (converted on first use); a directory -> itself; else a hub id."""
    if model is None:
        from folio.bundled_model import ensure_bundled_model

        return ensure_bundled_model()
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"model: {p} has no config.json (not an HF model directory)")
        return p
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_like_path:
        raise ValueError(f"model: path {model!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"]))
    except Exception as e:  # no network, unknown repo, gated repo...
        raise ValueError(
            f"model: {model!r} is neither a local directory nor downloadable from the hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
        ) from None


def read_config(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"model: architecture {arch} is not supported (supported: {sorted(SUPPORTED_ARCHITECTURES)})")
    return cfg


def resolve_dtype(dtype: str | torch.dtype, hf_config: dict, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # The checkpoint's dtype on GPU; float32 on CPU, where half precision is slow and inexact.
        if device.type != "cuda":
            return torch.float32
        name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16"
        return DTYPES.get(name, torch.bfloat16) if name != "float32" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {dtype!r}")
    return DTYPES[dtype]


def load_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors files in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors
