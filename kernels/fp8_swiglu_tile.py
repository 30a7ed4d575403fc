"""The SwiGLU tile the FP8 SwiGLU kernels share (kernels/fp8_fused.py's split and whole-row launches,
kernels/fp8_swiglu_wait.py's one launch), so that all give the same bits, and the check of their input."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_tile(gate_up_ptr, rs_ptr, col_ptr, rows, offs, r_ok, c_ok, inter, stride_in, SCALED: tl.constexpr):
    """A [ROWS, BLOCK] tile of silu(gate) * up in the 16-bit dtype, rounded as torch rounds it (kernels/silu_mul.py's
    _silu_mul_block arithmetic); with SCALED gate_up is an FP8 GEMM's output before its row and column scales,
    applied and rounded as the GEMM would have. The column scales are read once per tile, not once per row."""
    mask = r_ok[:, None] & c_ok[None, :]
    src = gate_up_ptr + rows.to(tl.int64)[:, None] * stride_in + offs[None, :]
    dt = gate_up_ptr.dtype.element_ty
    g = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(src + inter, mask=mask, other=0.0).to(tl.float32)
    if SCALED:
        rs = tl.load(rs_ptr + rows, mask=r_ok, other=0.0)[:, None]
        g = (g * rs * tl.load(col_ptr + offs, mask=c_ok, other=0.0)[None, :]).to(dt).to(tl.float32)
        u = (u * rs * tl.load(col_ptr + inter + offs, mask=c_ok, other=0.0)[None, :]).to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # torch rounds silu(g) before the product
    return (act * u).to(dt)


def check_gate_up(gate_up, scales) -> None:
    """SwiGLU's input: [num_tokens, 2 * inter] (gate, then up) with a contiguous last dim; `scales` (row, column)
    float32 of its row and column counts (kernels/silu_mul.py checks its inputs by it too)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must be [num_tokens, 2 * inter] with a contiguous last dim; got "
                         f"{tuple(gate_up.shape)}")
    if scales is not None and (scales[0].numel() != gate_up.shape[0] or scales[1].numel() != gate_up.shape[1]
                               or scales[0].dtype != torch.float32 or scales[1].dtype != torch.float32):
        raise ValueError(f"scales must be float32 [{gate_up.shape[0]}] and [{gate_up.shape[1]}] row and column scales")
