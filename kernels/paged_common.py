"""Pieces shared by the paged attention kernels: masked tile loads, the score modifiers of
AttentionParams (soft-cap, ALiBi, sinks) in base-2 units, and their host-side packing.

The kernels run their softmax in base 2 (exp2), so every logit they compare is `log2(e) * score`:
the host folds log2(e) into the scale and the soft-cap's outer factor; the kernels multiply the ALiBi
slopes and sinks by it as they load them (so the model's float32 tensors are passed as they are).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)


@triton.jit
def load_tile(ptrs, rows_ok, d_ok, ROWS_MASKED: tl.constexpr, D_MASKED: tl.constexpr, EVICTION: tl.constexpr):
    """[R, HEAD_DIM_PAD] load; masks only where the constexpr flags say so, so the common case
    (whole tile, power-of-two head_dim) compiles to unmasked vector loads. EVICTION: "" or "evict_first"
    (no default: Triton 3.6 cannot compile a jit function's default string constexpr)."""
    if ROWS_MASKED and D_MASKED:
        x = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0, eviction_policy=EVICTION)
    elif ROWS_MASKED:
        x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0, eviction_policy=EVICTION)
    elif D_MASKED:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0, eviction_policy=EVICTION)
    else:
        x = tl.load(ptrs, eviction_policy=EVICTION)
    return x


@triton.jit
def _tanh(x):
    # tanh from exp2 of a non-positive argument: no overflow, and the interpreter has no libdevice.
    t = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|)
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def base2_scores(s, key_pos, q_pos, slopes2, qk_scale, softcap_in, softcap_out2,
                 USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr):
    """Raw q.k [R, N] -> base-2 logits: scale, soft-cap (softcap_in = scale / softcap,
    softcap_out2 = softcap * log2e), then + slopes2_r * (key_pos - q_pos_r) (slopes2 = slope * log2e)."""
    if USE_SOFTCAP:
        s = softcap_out2 * _tanh(s * softcap_in)
    else:
        s = s * qk_scale
    if USE_ALIBI:
        s += slopes2[:, None] * (key_pos[None, :] - q_pos[:, None]).to(tl.float32)
    return s


@dataclass(frozen=True)
class KernelVariants:
    """AttentionParams' variants as the kernels take them (see docs/attention-seam.md)."""

    qk_scale: float  # scale * log2e
    softcap_in: float  # scale / softcap (unused without soft-cap)
    softcap_out2: float  # softcap * log2e
    window: int  # sliding window, 0 = none
    slopes: torch.Tensor | None  # fp32 [num_heads] ALiBi slopes, on the kernel's device
    sinks: torch.Tensor | None  # fp32 [num_heads] sink logits

    def launch_args(self, fallback: torch.Tensor) -> dict:
        """The kernels' variant arguments; an absent tensor is replaced by an unread placeholder."""
        return dict(
            slopes_ptr=self.slopes if self.slopes is not None else fallback,
            sinks_ptr=self.sinks if self.sinks is not None else fallback,
            qk_scale=self.qk_scale, softcap_in=self.softcap_in, softcap_out2=self.softcap_out2,
            window=self.window,
            USE_SOFTCAP=self.softcap_out2 != 0.0, USE_ALIBI=self.slopes is not None,
            USE_WINDOW=self.window > 0, USE_SINKS=self.sinks is not None,
        )


def kernel_variants(scale: float, num_heads: int, device: torch.device, sliding_window: int | None = None,
                    logit_softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
                    sinks: torch.Tensor | None = None) -> KernelVariants:
    """Checks the variant arguments (ValueError naming the field) and converts them to base 2."""
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be a positive finite number; got {scale}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None; got {sliding_window}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None; got {logit_softcap}")

    def per_head(name: str, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if tuple(t.shape) != (num_heads,):
            raise ValueError(f"{name} must be [num_heads={num_heads}]; got {tuple(t.shape)}")
        return t.to(device=device, dtype=torch.float32).contiguous()  # no copy when already so

    return KernelVariants(
        qk_scale=scale * LOG2E,
        softcap_in=scale / logit_softcap if logit_softcap else 0.0,
        softcap_out2=logit_softcap * LOG2E if logit_softcap else 0.0,
        window=sliding_window or 0,
        slopes=per_head("alibi_slopes", alibi_slopes),
        sinks=per_head("sinks", sinks),
    )


def head_dim_pad(head_dim: int) -> int:
    """The kernels' tile width over head_dim: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))
