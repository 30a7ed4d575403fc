"""The model shape the engine reads from config.json, checked once so a bad file fails with its field's name."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """The fields every architecture has (under one name each) plus the raw config.json for the rest.

    Families whose config.json spells the common fields differently (GPT-2's n_embd, n_layer...) pass
    `aliases` to `from_hf`; family-specific fields are read with `get` / `require`."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    hf: dict = field(repr=False)
    source: str = "config.json"

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json", aliases: dict[str, tuple[str, ...]] | None = None,
                defaults: dict | None = None) -> "ModelConfig":
        aliases, defaults = aliases or {}, defaults or {}

        def pick(name, default=None, required=True):
            for key in (name, *aliases.get(name, ())):
                if hf.get(key) is not None:
                    return hf[key]
            if name in defaults:
                return defaults[name]
            if required and default is None:
                names = " or ".join(repr(k) for k in (name, *aliases.get(name, ())))
                raise ValueError(f"{source}: field {names} is missing")
            return default

        arch = (hf.get("architectures") or ["?"])[0]
        hidden = _positive(source, "hidden_size", pick("hidden_size"))
        heads = _positive(source, "num_attention_heads", pick("num_attention_heads"))
        kv = _positive(source, "num_key_value_heads", pick("num_key_value_heads", heads))
        if heads % kv:
            raise ValueError(f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
        head_dim = pick("head_dim", required=False)
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"{source}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}) "
                                 f"when head_dim is not given")
            head_dim = hidden // heads
        return cls(
            architecture=arch, model_type=hf.get("model_type", "?"),
            vocab_size=_positive(source, "vocab_size", pick("vocab_size")),
            hidden_size=hidden,
            intermediate_size=_positive(source, "intermediate_size", pick("intermediate_size", 4 * hidden)),
            num_hidden_layers=_positive(source, "num_hidden_layers", pick("num_hidden_layers")),
            num_attention_heads=heads, num_key_value_heads=kv,
            head_dim=_positive(source, "head_dim", head_dim),
            max_position_embeddings=_positive(source, "max_position_embeddings", pick("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(pick("tie_word_embeddings", False, required=False)),
            hf=hf, source=source,
        )

    def get(self, key: str, default=None):
        v = self.hf.get(key)
        return default if v is None else v

    def require(self, key: str):
        if self.hf.get(key) is None:
            raise ValueError(f"{self.source}: field {key!r} is missing (needed by {self.architecture})")
        return self.hf[key]


def _positive(source: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: field {name!r} must be a positive integer, got {value!r}")
    return value
