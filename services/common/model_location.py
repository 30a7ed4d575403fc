"""Where a model lives: the bundled model, a local Hugging Face directory, or a hub id (downloaded)."""

from __future__ import annotations

from pathlib import Path


def resolve_model_path(model: str | None) -> Path:
    """None -> the bundled model (converted on first use); a directory -> itself; else a hub id."""
    if model is None:
        from services.common.bundled_model import ensure_bundled_model

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
