"""Read a model directory's config and stream its safetensors, one tensor at a time, into a built model.

Tensors are opened lazily (safetensors slices): a tensor-parallel rank reads only its cut of each
tensor and copies it straight into its parameter, so the model is never held twice. Only safetensors
are read: `.bin` checkpoints are pickles that can run code when loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_config(model_dir: Path) -> dict:
    """config.json as a dict, after checking that its architecture is one Folio serves."""
    from services.engine.model.registry import model_class

    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise ValueError(f"model: {model_dir} has no config.json (expected a Hugging Face model directory)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    model_class(cfg, str(path))
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


class CheckpointTensor:
    """One named tensor of a checkpoint, read on demand (whole or a slice along one dimension)."""

    def __init__(self, name: str, where: str, shape: tuple[int, ...], reader):
        self.name, self.where, self.shape, self._reader = name, where, tuple(shape), reader

    def load(self) -> torch.Tensor:
        return self._reader(None)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self._reader((dim, start, length))

    def transposed(self) -> "CheckpointTensor":
        """The same 2-D tensor read as its transpose (GPT-2's Conv1D stores [in, out]); still lazy."""
        def read(cut):
            if cut is None:
                return self._reader(None).t()
            dim, start, length = cut
            return self._reader((1 - dim, start, length)).t()

        return CheckpointTensor(self.name, self.where, self.shape[::-1], read)

    def mapped(self, fn) -> "CheckpointTensor":
        """The tensor after a same-shape rearrangement `fn` (e.g. per-head q/k/v rows regrouped into q, k, v
        blocks); `fn` needs the whole tensor, so this one is read whole before its rank's cut is taken."""
        def read(cut):
            t = fn(self._reader(None))
            return t if cut is None else t.narrow(*cut)

        return CheckpointTensor(self.name, self.where, self.shape, read)

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, where: str = "weights") -> "CheckpointTensor":
        def read(cut):
            return tensor if cut is None else tensor.narrow(*cut)

        return cls(name, where, tuple(tensor.shape), read)


def checkpoint_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ValueError(f"{index}: lists {missing} which are not in {model_dir}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    if pickles:
        raise ValueError(
            f"model: {model_dir} has only PyTorch pickle weights ({', '.join(pickles[:3])}); Folio loads safetensors "
            f"only, because a pickle can run code when it is loaded. Convert once with transformers: "
            f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise ValueError(f"model: no *.safetensors files in {model_dir}")


def iter_checkpoint(model_dir: Path) -> Iterator[CheckpointTensor]:
    """Every tensor of the checkpoint, lazily, one file open at a time."""
    from safetensors import safe_open

    for path in checkpoint_files(model_dir):
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # a truncated or foreign file: name it
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        with f:
            for name in f.keys():
                sl = f.get_slice(name)

                def read(cut, sl=sl, name=name, f=f):
                    if cut is None:
                        return f.get_tensor(name)
                    dim, start, length = cut
                    idx = tuple(slice(None) for _ in range(dim)) + (slice(start, start + length),)
                    return sl[idx]

                yield CheckpointTensor(name, str(path), tuple(sl.get_shape()), read)


def iter_tensors(tensors: dict[str, torch.Tensor]) -> Iterator[CheckpointTensor]:
    """An in-memory state dict as a checkpoint (tests, dummy weights)."""
    for name, t in tensors.items():
        yield CheckpointTensor.of(name, t)
