"""What the 4-bit weight-only schemes (GPTQ, AWQ, compressed-tensors W4A16) become once loaded: one layout
that the Triton W4A16 kernels (kernels/w4a16.py) and the CPU reference both read.

    qweight [16 * ceil(K/128), N] int32: kernels/w4a16.py's blocked layout (`pack_int4`), made once here so
            that the kernels unpack a block's nibbles with a shift and a mask, no permute
    scales  [G, N] in the model's dtype; zeros [G, N] uint8 (the unsigned zero point; 8 when symmetric)
    perm    [K] int32 or None: act-order, rows sorted by group; the kernel reads x's columns through it
Each scheme's loader converts its own on-disk packing into this once, after loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.w4a16 import pack_int4, reserve_workspace, w4a16, w4a16_reference
from services.engine.model.layers.activation import SiluMulOutput
from services.engine.model.layers.linear import weight_param

BITS = 4
FUSE_SWIGLU = True
"""At batch 1 a SwiGLU MLP's gate/up projection (`then_act`, set by the model: its ActAndMul) returns
silu(gate) * up itself, from the GEMV's epilogue (kernels/w4a16_stream.py): a launch fewer per layer."""


def _kernels(x: torch.Tensor) -> bool:
    """Run the Triton kernels (CUDA), else the dequantize-then-matmul reference."""
    return x.is_cuda


def unpack_rows(packed: torch.Tensor, k: int) -> torch.Tensor:
    """GPTQ's on-disk packing, row 8p+i in bits 4i of word p: [ceil(k/8), N] int32 -> [k, N] int32 0..15."""
    shifts = torch.arange(0, 32, BITS, device=packed.device, dtype=torch.int32)
    return ((packed[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, packed.shape[1])[:k]


def unpack_cols(packed: torch.Tensor, n: int) -> torch.Tensor:
    """[R, ceil(n/8)] int32, column 8p+i in bits 4i of word p -> [R, n] int32."""
    return unpack_rows(packed.t(), n).t()


def act_order_perm(prefix: str, g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """g_idx [K] (each input row's group) -> the permutation that sorts rows by group, or None when the
    groups are already contiguous. Refuses a g_idx that does not give every group `group_size` rows."""
    k = g_idx.numel()
    g_idx = g_idx.to(torch.int64).cpu()
    natural = torch.arange(k) // group_size
    if torch.equal(g_idx, natural):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], natural):
        raise ValueError(f"{prefix}: g_idx does not assign {group_size} input rows to each group (the act-order "
                         f"layout GPTQ writes); the checkpoint contradicts quantization_config.group_size")
    return perm.to(torch.int32)


class Int4Layout:
    """The loaded form's apply; the scheme classes subclass it and call `install` from their
    `process_after_loading`."""

    def install(self, layer, q_kn: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                perm: torch.Tensor | None) -> None:
        """q_kn [K, N] values 0..15 (rows in checkpoint order), scales/zeros [G, N]; replaces the checkpoint
        parameters by the canonical ones."""
        k, n = q_kn.shape
        dev = scales.device
        if perm is not None:
            q_kn = q_kn[perm.to(q_kn.device).long()]
        for name, _ in list(layer.named_parameters(recurse=False)):
            if name != "bias":
                delattr(layer, name)
        layer.qweight = weight_param(pack_int4(q_kn.to(torch.int32)).to(dev))
        layer.scales = weight_param(scales.contiguous())
        layer.zeros = weight_param(zeros.to(torch.uint8).to(dev))
        layer.perm = weight_param(perm.to(dev)) if perm is not None else None
        layer.group_size, layer.in_k = group_size, k
        for p in (layer.qweight, layer.scales, layer.zeros, layer.perm):
            if p is not None:
                p.quantized = True
        if dev.type == "cuda":
            reserve_workspace(dev, n, k, scales.dtype)

    def init_dummy(self, layer, g: torch.Generator) -> None:
        """Random 4-bit weights in the loaded layout (load_format="dummy"): about N(0, 0.02) once dequantized."""
        k, n, dev = layer.in_features, layer.out_features, g.device
        group = getattr(self, "group_size", None) or getattr(self.cfg, "group_size", k)
        group = k if group == -1 else group
        q = torch.randint(0, 16, (k, n), generator=g, device=dev)
        scales = torch.full((-(-k // group), n), 0.0045, device=dev, dtype=layer.params_dtype)
        self.install(layer, q, scales, torch.full_like(scales, 8, dtype=torch.uint8), group, None)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        act = getattr(layer, "then_act", None)
        if (FUSE_SWIGLU and act is not None and act.fused and act.act is F.silu and bias is None
                and x2.shape[0] == 1 and _kernels(x)):
            y = w4a16(x2, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.perm, gated=True)
            return SiluMulOutput(y.reshape(*shape[:-1], y.shape[-1]))
        if _kernels(x):
            y = w4a16(x2, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.perm)
        else:
            y = w4a16_reference(x2, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.perm)
        y = y.reshape(*shape[:-1], y.shape[-1])
        return y if bias is None else y + bias
