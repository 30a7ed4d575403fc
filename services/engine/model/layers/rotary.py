"""Rotary position embeddings: NeoX (rotate halves) and GPT-J (rotate pairs) layouts, partial rotary, and
the context-extension scalings linear / dynamic NTK / YaRN / llama3 / longrope, with HF's formulas.

Where HF's choice depends on the whole forward pass (dynamic NTK and longrope look at the longest
position in the batch), Folio decides per token from the token's own position, so the result does not
depend on what else is batched: equal to HF for sequences within the original context; documented in
docs/models.md for longer ones.
"""

from __future__ import annotations

import math

import torch

from services.engine.model.config import ModelConfig


def rope_parameters(cfg: ModelConfig, layer_type: str | None = None) -> dict:
    """The rope settings of one layer type in one dict (HF 5's `rope_parameters`, possibly nested by layer
    type, or HF 4's `rope_theta` + `rope_scaling` + `partial_rotary_factor`), with `rope_type` filled in."""
    hf = cfg.hf
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and layer_type is not None and isinstance(rp.get(layer_type), dict):
        rp = rp[layer_type]
    elif isinstance(rp, dict) and any(isinstance(v, dict) for v in rp.values()):
        rp = next(v for v in rp.values() if isinstance(v, dict))
    params = dict(rp or hf.get("rope_scaling") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    if hf.get("original_max_position_embeddings") is not None and params["rope_type"] == "longrope":
        params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]  # Phi-3's, as HF
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings", cfg.max_position_embeddings)
    return params


def _need(params: dict, key: str, cfg: ModelConfig):
    if params.get(key) is None:
        raise ValueError(f"{cfg.source}: rope scaling {params['rope_type']!r} needs field {key!r}")
    return params[key]


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv: torch.Tensor, p: dict, cfg) -> torch.Tensor:
    factor, low, high = _need(p, "factor", cfg), p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old_ctx = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(base: float, dim: int, p: dict, cfg) -> tuple[torch.Tensor, float]:
    factor = p.get("factor") or cfg.max_position_embeddings / p["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attn = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
    orig = p["original_max_position_embeddings"]

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extra = 1 - ramp  # share of the unscaled (extrapolated) frequency
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv, attn


class RotaryEmbedding(torch.nn.Module):
    """Rotates the first `rotary_dim` features of every q and k head by position.

    `is_neox`: pairs are (i, i + rotary_dim / 2) (GPT-NeoX, Llama); otherwise adjacent (2i, 2i + 1)
    (GPT-J, GLM). cos and sin carry YaRN's / longrope's attention factor."""

    def __init__(self, cfg: ModelConfig, head_dim: int, params: dict, is_neox: bool = True,
                 rotary_dim: int | None = None):
        super().__init__()
        self.head_dim, self.is_neox = head_dim, is_neox
        self.rotary_dim = rotary_dim or int(head_dim * params.get("partial_rotary_factor", 1.0))
        dim, base, kind = self.rotary_dim, float(params["rope_theta"]), params["rope_type"]
        self.kind, self.attention_factor = kind, 1.0
        self.switch_at, long_inv = None, None
        inv = _base_inv_freq(base, dim)
        if kind == "linear":
            inv = inv / _need(params, "factor", cfg)
        elif kind == "llama3":
            inv = _llama3(inv, params, cfg)
        elif kind == "yarn":
            inv, self.attention_factor = _yarn(base, dim, params, cfg)
        elif kind == "dynamic":
            # NTK-aware base for a context of (position + 1) tokens, used past max_position_embeddings.
            self.dyn = (base, float(_need(params, "factor", cfg)), cfg.max_position_embeddings)
            self.switch_at = cfg.max_position_embeddings
        elif kind == "longrope":
            orig = params["original_max_position_embeddings"]
            short, long = _need(params, "short_factor", cfg), _need(params, "long_factor", cfg)
            for name, f in (("short_factor", short), ("long_factor", long)):
                if len(f) != dim // 2:
                    raise ValueError(f"{cfg.source}: rope scaling {name} has {len(f)} entries, expected {dim // 2}")
            shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            inv = 1.0 / (torch.tensor(short, dtype=torch.float32) * base ** shape)
            long_inv = 1.0 / (torch.tensor(long, dtype=torch.float32) * base ** shape)
            factor = params.get("factor") or cfg.max_position_embeddings / orig
            attn = params.get("attention_factor")
            self.attention_factor = attn if attn is not None else (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig)))
            self.switch_at = orig
        elif kind != "default":
            raise ValueError(f"{cfg.source}: rope scaling type {kind!r} is not supported "
                             f"(supported: default, linear, dynamic, yarn, llama3, longrope)")
        self.register_buffer("inv_freq", inv, persistent=False)
        if long_inv is not None:
            self.register_buffer("long_inv_freq", long_inv, persistent=False)
        self.fused = False  # the Triton in-place kernel (GPU; NeoX layout, whole head, power-of-two half)
        self._cached: tuple | None = None

    def reset_cache(self) -> None:
        self._cached = None

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 [T, rotary_dim // 2] each; computed once per step (the model resets the cache)."""
        if self._cached is not None and self._cached[0] is positions:
            return self._cached[1], self._cached[2]
        pos = positions.float()[:, None]
        freqs = pos * self.inv_freq[None, :]
        if self.kind == "longrope":
            long = positions[:, None] >= self.switch_at  # position + 1 > original context: long factors
            freqs = torch.where(long, pos * self.long_inv_freq[None, :], freqs)
        elif self.kind == "dynamic":
            base, factor, max_pos = self.dyn
            dim = self.rotary_dim
            # HF's rounding: the grown base in double, then 1 / base ** (2i / dim) in float32.
            seq = (positions.double() + 1).clamp(min=max_pos)[:, None]
            scaled_base = (base * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))).float()
            expo = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
            freqs = pos * (1.0 / scaled_base ** expo[None, :])
        cos, sin = freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
        self._cached = (positions, cos, sin)
        return cos, sin

    def fusable(self) -> bool:
        """Whether the Triton kernels can turn this rotary (kernels/rotary.py: NeoX layout, the whole head, a
        power-of-two half), so that one of them may also write k and v into the paged cache."""
        half = self.rotary_dim // 2
        return self.fused and self.is_neox and self.rotary_dim == self.head_dim and half & (half - 1) == 0

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [T, Hq * head_dim], k [T, Hkv * head_dim] -> rotated (in place on the fused path)."""
        cos, sin = self.cos_sin(positions)
        d, half = self.head_dim, self.rotary_dim // 2
        if (self.fused and self.is_neox and self.rotary_dim == d and half & (half - 1) == 0
                and q.stride(-1) == 1 and k.stride(-1) == 1):
            from kernels.rotary import rotary_inplace, rotary_qk_inplace

            if not rotary_qk_inplace(q, k, cos, sin, d):  # q and k not side by side: a launch each
                rotary_inplace(q, cos, sin, q.shape[-1] // d, 0, d)
                rotary_inplace(k, cos, sin, k.shape[-1] // d, 0, d)
            return q, k
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # HF's rounding: cos/sin cast to the model dtype, x * cos + rotate(x) * sin in that dtype.
        T = x.shape[0]
        x = x.view(T, -1, self.head_dim)
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        c, s = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
        if self.is_neox:
            c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
            half = self.rotary_dim // 2
            turned = torch.cat((-rot[..., half:], rot[..., :half]), -1)
        else:
            c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
            turned = torch.stack((-rot[..., 1::2], rot[..., 0::2]), -1).flatten(-2)
        out = rot * c + turned * s
        if rest.shape[-1]:
            out = torch.cat((out, rest), -1)
        return out.reshape(T, -1)
