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

import os
from typing import NamedTuple

from kernels import w4a16_mlp
from kernels.w4a16 import pack_int4, reserve_workspace, w4a16, w4a16_reference
from services.engine.model.layers.activation import SiluMulOutput
from services.engine.model.layers.linear import weight_param

BITS = 4
FUSE_SWIGLU = True
"""At batch 1 a SwiGLU MLP's gate/up projection (`then_act`, set by the model: its ActAndMul) returns
silu(gate) * up itself, from the GEMV's epilogue (kernels/w4a16_stream.py): a launch fewer per layer."""
FUSE_ROPE = False
"""At batch 1 a fused qkv projection whose model set `then_rope` (llama.py: cos, sin, cache, slots, head_dim, heads)
turns q and k and writes k and v into the paged cache in the GEMV's epilogue (kernels/w4a16_rope.py) and returns a
RotatedQKV: the rotary + cache launch goes. Off: exact on the H200 but ~0.035 ms/token slower there (2.121 against
2.080 and 2.104 against 2.075 ms/token, session 8, docs/quantization.md); bench/w4a16.py's +rope turns it on."""
FUSE_MLP = os.environ.get("FOLIO_W4A16_MLP", "0") == "1"
"""At batch 1 a SwiGLU MLP whose gate/up and down projections are both W4A16 (the model sets `then_down` next to
`then_act`; one rank, no biases) runs as one persistent launch (kernels/w4a16_mlp.py: gate/up, SwiGLU and down with
a grid-wide barrier between the GEMVs) and the gate/up projection returns an MLPOutput, the MLP's result. Off: correct
on the H200 (the same greedy tokens) but slower, 42 against 31 us per layer (session 9, docs/quantization.md): the
fused kernel's registers keep too few loads in flight; bench/w4a16.py's +mlp turns it on."""
FUSE_POST = os.environ.get("FOLIO_W4A16_POST", "0") == "1"
"""At batch 1 a Llama layer's o projection whose model set `then_post` (llama.py: the post-attention RMSNorm, the
MLP, the residual) runs o_proj, the residual add, the norm and the MLP as one persistent launch
(kernels/w4a16_mlp.py's post_attention) and returns a LayerOutput (the MLP's output; the residual updated in place):
where all three projections are W4A16 on one rank without biases and the norm is Llama's. Off: correct on the H200
but slower (48 against 39 us per layer; engine 2.969 against 2.089 ms/token with the default config; session 9)."""
FUSE_FRONT = os.environ.get("FOLIO_W4A16_FRONT", "0") == "1"
"""With FUSE_POST, where the model also names the next layer's input norm and qkv projection (`then_post`'s fourth
item; same conditions), the same launch runs the residual add of this layer's output, that norm and that qkv
projection, and the LayerOutput holds the next layer's qkv (`next_qkv`): a layer is its attention and one launch.
Off: correct on the H200, slower (engine 3.191 ms/token; session 9)."""


class RotatedQKV(NamedTuple):
    """A fused qkv projection's output with q and k already turned and k and v already in the paged cache (FUSE_ROPE);
    the model passes its parts to Attention.forward with cache_written."""
    qkv: torch.Tensor


class MLPOutput(NamedTuple):
    """The whole MLP's output (down(silu(gate) * up)), returned by a W4A16 gate/up projection at batch 1 (FUSE_MLP);
    the model's MLP returns it as its result and skips its activation and down projection."""
    y: torch.Tensor


class LayerOutput(NamedTuple):
    """A layer's MLP output returned by its W4A16 o projection at batch 1 (FUSE_POST), the residual already updated;
    the model skips its post-attention norm and MLP. next_qkv (FUSE_FRONT): y is the next layer's qkv projection of
    its input norm instead (that residual add done too)."""
    y: torch.Tensor
    next_qkv: bool = False


class QKVReady(NamedTuple):
    """The next layer's qkv projection, computed by the previous layer's launch (FUSE_FRONT): the layer skips its
    input norm and its qkv projection."""
    qkv: torch.Tensor


def _weights(layer) -> tuple:
    return layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.perm


def _one_rank_int4(layer) -> bool:
    """A W4A16 linear layer on one rank without a bias (the fused launches' projections)."""
    return (layer is not None and isinstance(layer.method, Int4Layout) and getattr(layer, "qweight", None) is not None
            and layer.bias is None and layer.tp is None)


def _fused_layer(layer, x2: torch.Tensor) -> LayerOutput | None:
    """kernels/w4a16_mlp.py's post_attention when this o projection and its `then_post` (norm, mlp, residual, and
    the next layer's (input norm, qkv projection) or None) can run as one launch, else None."""
    post = getattr(layer, "then_post", None)
    if not FUSE_POST or post is None or x2.shape[0] != 1 or not _kernels(x2) or not _one_rank_int4(layer):
        return None
    norm, mlp, residual, front = post
    gate_up, down = mlp.gate_up_proj, mlp.down_proj
    act = getattr(gate_up, "then_act", None)
    if (not (_one_rank_int4(gate_up) and _one_rank_int4(down)) or act is None or act.act is not F.silu
            or not _llama_norm(norm) or residual.shape != (1, layer.qweight.shape[1]) or not residual.is_contiguous()
            or residual.dtype != x2.dtype):
        return None
    hidden, inter = residual.shape[1], gate_up.qweight.shape[1] // 2
    nxt = None
    if FUSE_FRONT and front is not None and _llama_norm(front[0]) and _one_rank_int4(front[1]):
        nxt = (front[0].weight, front[0].eps, _weights(front[1]))
    y = w4a16_mlp.post_attention(x2, residual, _weights(layer), norm.weight, norm.eps, _weights(gate_up),
                                 _weights(down), config=w4a16_mlp.config_for(hidden, inter), front=nxt)
    return LayerOutput(y, nxt is not None)


def _llama_norm(norm) -> bool:
    """Llama's RMSNorm (w * normed rounded to the model dtype), on one rank, on its fused kernel path."""
    return norm.fused and not norm.gemma and not norm.scale_in_float32 and norm.tp is None


def _fused_mlp(layer, x2: torch.Tensor) -> torch.Tensor | None:
    """The MLP's output from kernels/w4a16_mlp.py when this gate/up projection and its `then_down` can run as one
    launch (batch 1 on CUDA, SiLU, both W4A16, one rank, no biases), else None."""
    down = getattr(layer, "then_down", None)
    if not FUSE_MLP or x2.shape[0] != 1 or not _kernels(x2) or not (_one_rank_int4(layer) and _one_rank_int4(down)):
        return None
    return w4a16_mlp.mlp(x2, _weights(layer), _weights(down),
                         config=w4a16_mlp.config_for(x2.shape[1], layer.qweight.shape[1] // 2))


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
            w4a16_mlp.barrier(dev)  # before any CUDA graph capture (FUSE_MLP)

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
            y = _fused_mlp(layer, x2)
            if y is not None:
                return MLPOutput(y.reshape(*shape[:-1], y.shape[-1]))
            y = w4a16(x2, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.perm, gated=True)
            return SiluMulOutput(y.reshape(*shape[:-1], y.shape[-1]))
        if x2.shape[0] == 1 and getattr(layer, "then_post", None) is not None:
            out = _fused_layer(layer, x2)
            if out is not None:
                return LayerOutput(out.y.reshape(*shape[:-1], out.y.shape[-1]), out.next_qkv)
        rope = getattr(layer, "then_rope", None)
        if FUSE_ROPE and rope is not None and bias is None and x2.shape[0] == 1 and _kernels(x):
            y, done = w4a16(x2, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.perm,
                            rope=rope)
            y = y.reshape(*shape[:-1], y.shape[-1])
            return RotatedQKV(y) if done else y
        if _kernels(x):
            y = w4a16(x2, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.perm)
        else:
            y = w4a16_reference(x2, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.perm)
        y = y.reshape(*shape[:-1], y.shape[-1])
        return y if bias is None else y + bias
