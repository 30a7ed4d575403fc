"""What every quantization scheme shares: reading its config fields with errors that name them, choosing
a weight method per linear layer by the layer's checkpoint names (ignore lists), and installing them."""

from __future__ import annotations

import re

import torch


class QuantConfig:
    """A parsed `quantization_config`. Subclasses read their fields in `from_config` and return each
    layer's weight method from `method_for` (None: the layer stays unquantized)."""

    name = "?"
    source = "config.json"

    @classmethod
    def from_config(cls, qc: dict, source: str) -> "QuantConfig":
        raise NotImplementedError

    def method_for(self, prefix: str, ckpt_names: list[str], layer):
        raise NotImplementedError

    def check_device(self, device: torch.device) -> None:
        """Refuse a device whose kernels cannot run this scheme (a ValueError naming the scheme)."""

    def field(self, qc: dict, key: str, types, default=None, choices=None):
        """quantization_config[key], checked: a ValueError names the field and what it may be."""
        v = qc.get(key, default)
        if v is None:
            return v
        if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise ValueError(f"{self.source}: quantization_config.{key} must be {types}, got {v!r}")
        if not isinstance(v, types):
            raise ValueError(f"{self.source}: quantization_config.{key} must be {types}, got {v!r}")
        if choices is not None and v not in choices:
            raise ValueError(f"{self.source}: quantization_config.{key} must be one of {list(choices)}, got {v!r}")
        return v


def matches(name: str, pattern: str) -> bool:
    """An ignore/target entry: `re:<regex>` (compressed-tensors), else a module name or a name suffix."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or ("." + pattern + ".") in ("." + name + ".")


def all_or_none(prefix: str, ckpt_names: list[str], pred, what: str) -> bool:
    """Whether `pred` holds for every checkpoint projection of a fused layer; a fused layer whose parts
    disagree (q quantized, v not) cannot be one matrix."""
    hits = [pred(n) for n in ckpt_names]
    if any(hits) and not all(hits):
        raise ValueError(f"{prefix}: {what} lists only some of {ckpt_names}; Folio fuses them into one matrix, "
                         f"so they must all be quantized or all be left unquantized")
    return all(hits)


def _ckpt_names(model, prefix: str) -> list[str]:
    """The checkpoint module names that land in Folio's module `prefix` (q/k/v for qkv_proj)."""
    key = prefix + "."
    names = [key.replace(f, c).rstrip(".") for f, c, _ in model.stacked_params if f in key]
    return list(dict.fromkeys(names)) or [prefix]


def apply_quantization(model, qcfg: QuantConfig | None) -> None:
    """Give every linear layer its weight method (by its checkpoint names) and create its parameters."""
    from services.engine.model.layers.linear import LinearBase, PlainWeight

    # By name: layers/moe.py reaches the loader, which reaches this package (an import cycle).
    if qcfg is not None and any(type(m).__name__ == "FusedMoE" for m in model.modules()):
        raise ValueError(f"{qcfg.source}: quantization_config ({qcfg.name}) on a mixture-of-experts model: Folio's "
                         f"expert kernels take unquantized weights only (docs/quantization.md)")
    for prefix, m in model.named_modules():
        if isinstance(m, LinearBase):
            m.prefix = prefix
            method = qcfg.method_for(prefix, _ckpt_names(model, prefix), m) if qcfg is not None else None
            m.set_method(method or PlainWeight())


def check_divides(prefix: str, field: str, value: int, size: int, what: str) -> None:
    if value <= 0 or size % value:
        raise ValueError(f"{prefix}: quantization_config.{field} = {value} does not divide the layer's {what} "
                         f"({size})")
