"""Where a model lives: the bundled model, a local Hugging Face directory, or a hub id (downloaded)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from urllib.parse import urlparse

# "gpt2", "Qwen/Qwen3-0.6B": one or two names of letters, digits, '-', '_', '.' (the hub's repo id rules).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def is_hub_id(model: str) -> bool:
    return bool(_HUB_ID.match(model)) and ".." not in model and not model.endswith(".")


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
    if p.exists():
        raise ValueError(f"model: {model!r} is a file; expected a Hugging Face model directory or a hub id")
    if not is_hub_id(model):
        raise ValueError(f"model: path {model!r} does not exist (and it is not a hub id like 'gpt2' or 'org/name')")
    return _download(model)


def served_name(model: str | None, model_dir: Path) -> str:
    """The name clients use by default: a hub id as given (as vLLM does), else the directory's name."""
    if model is not None and is_hub_id(model) and not Path(model).expanduser().is_dir():
        return model
    return model_dir.name


def _download(repo_id: str) -> Path:
    """The hub's snapshot of `repo_id` (safetensors, configs, tokenizer): from the local cache if there, else
    downloaded. Fails in seconds with one line when the hub is unreachable (no retries, no hub traceback)."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_PATTERNS, local_files_only=True))
    except Exception:
        pass  # not cached (completely): fetch it
    endpoint = constants.ENDPOINT
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"model: {repo_id!r} is not a local directory nor in the hub cache, and hub access is "
                         f"switched off (HF_HUB_OFFLINE)")
    if not _reachable(endpoint):
        raise ValueError(f"model: {repo_id!r} is not a local directory nor in the hub cache, and the Hugging Face "
                         f"hub ({endpoint}) could not be reached to download it")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_PATTERNS))
    except Exception as e:  # unknown repo, gated repo, network dropped...
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise ValueError(f"model: {repo_id!r} could not be downloaded from {endpoint} ({type(e).__name__}: {detail})") from None


def _reachable(url: str, timeout: float = 3.0) -> bool:
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False
