"""SwiGLU activation: silu(gate) * up from the fused gate/up projection, in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,  # [num_tokens, 2 * inter]: gate columns, then up columns
    out_ptr,  # [num_tokens, inter]
    stride_in,
    stride_out,
    inter,
    BLOCK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(gate_up_ptr + tok * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_ptr + tok * stride_in + inter + offs, mask=mask, other=0.0)
    # torch rounds silu(g) to the dtype before the product; do the same.
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + tok * stride_out + offs, (act * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [num_tokens, 2 * inter] -> silu(gate) * up [num_tokens, inter]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must be [num_tokens, 2 * inter] with a contiguous last dim; got {tuple(gate_up.shape)}")
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device)
    if t == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), out.stride(0), inter,
                                                     BLOCK=block, num_warps=4)
    return out


def silu_mul_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
