"""A test quantizer: writes a float model's linear weights in each on-disk format from the format's own
description (GPTQ, AWQ, vLLM fp8, fbgemm_fp8) or through the compressed-tensors library (its pack-quantized
compressor), and returns the dequantized float32 weights the reference model runs with.

The integers, scales and zero points are computed here, and the reference weights are (q - zero) * scale
from them before any packing: the reference never passes through Folio's unpacking."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Projections of one input: GPTQ's act-order permutation comes from that input, so they share g_idx."""
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FP8 = torch.float8_e4m3fn


def int4_groups(w: torch.Tensor, group: int, sym: bool, scale_dtype=torch.float16):
    """w [N, K] -> (q [N, K] 0..15, scales [N, G], zeros [N, G] 0..15): min/max over each group of inputs."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    if sym:
        s = wg.abs().amax(-1) / 7.5
        z = torch.full_like(s, 8)
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        s = (hi - lo) / 15
        z = torch.round(-lo / s.clamp(min=1e-8))
    s = s.clamp(min=1e-6).to(scale_dtype).float()
    q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, 15)
    return q.reshape(n, k).to(torch.int32), s, z.to(torch.int32)


def dequant(q, s, z, group):
    idx = torch.arange(q.shape[1]) // group
    return (q - z[:, idx]).float() * s[:, idx]


def pack_along_rows(v: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[R, C] 0..15 -> [R/8, C] int32: bits 4i of word p hold row 8p + order[i]."""
    r, c = v.shape
    out = torch.zeros(r // 8, c, dtype=torch.int64)
    v = v.long().reshape(r // 8, 8, c)
    for i, src in enumerate(order):
        out |= v[:, src] << (4 * i)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


def linear_names(state: dict) -> list[str]:
    return [k[:-len(".weight")] for k in state if k.endswith(".weight") and k.split(".")[-2] in LINEARS]


def gptq(state: dict, group: int, sym: bool, desc_act: bool, seed: int = 0):
    """-> (tensors, quantization_config, dequantized state). group -1: one group over K; v1 zero - 1."""
    out, deq = dict(state), dict(state)
    g = torch.Generator().manual_seed(seed)
    perms: dict[str, torch.Tensor] = {}
    for name in linear_names(state):
        w = state[name + ".weight"].float()
        n, k = w.shape
        gs = k if group == -1 else group
        key = name.rsplit(".", 1)[0] + next((str(f) for f in FUSED_INPUTS if name.split(".")[-1] in f), name)
        perm = perms.setdefault(key, torch.randperm(k, generator=g)) if desc_act else torch.arange(k)
        q_p, s, z = int4_groups(w[:, perm], gs, sym)  # groups over the permuted inputs, as GPTQ quantizes
        inv = torch.argsort(perm)
        deq[name + ".weight"] = dequant(q_p, s, z, gs)[:, inv]
        q = q_p[:, inv]
        del out[name + ".weight"]
        out[name + ".qweight"] = pack_along_rows(q.t())
        out[name + ".qzeros"] = _pack_cols(z - 1)  # format "gptq" (v1) stores zero - 1
        out[name + ".scales"] = s.t().contiguous().half()
        out[name + ".g_idx"] = (torch.arange(k) // gs)[inv].to(torch.int32)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym, "desc_act": desc_act,
          "checkpoint_format": "gptq"}
    return out, qc, deq


def _pack_cols(v: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[N, G] -> [G, N/8] int32 packed along N (v is given [N, G]: zero points per output row)."""
    return pack_along_rows(v, order).t().contiguous()


def awq(state: dict, group: int):
    out, deq = dict(state), dict(state)
    for name in linear_names(state):
        w = state[name + ".weight"].float()
        q, s, z = int4_groups(w, group, sym=False)
        deq[name + ".weight"] = dequant(q, s, z, group)
        del out[name + ".weight"]
        out[name + ".qweight"] = pack_along_rows(q, AWQ_ORDER).t().contiguous()  # [K, N/8], packed along N
        out[name + ".qzeros"] = _pack_cols(z, AWQ_ORDER)
        out[name + ".scales"] = s.t().contiguous().half()
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    return out, qc, deq


def compressed_int4(state: dict, group: int, sym: bool):
    """Through compressed-tensors' own compressor; the reference is its own decompression."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group" if group > 0 else "channel",
                            group_size=group if group > 0 else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    out, deq = dict(state), dict(state)
    for name in linear_names(state):
        w = state[name + ".weight"].float()
        gs = group if group > 0 else w.shape[1]
        _, s, z = int4_groups(w, gs, sym, scale_dtype=torch.float32)
        parts = {"weight": w, "weight_scale": s}
        if not sym:
            parts["weight_zero_point"] = (z - 8).to(torch.int8)  # compressed-tensors' zero points are signed
        packed = PackedQuantizationCompressor.compress(parts, scheme)
        deq[name + ".weight"] = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"].float()
        del out[name + ".weight"]
        out.update({f"{name}.{k}": v for k, v in packed.items()})
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized", ignore=["lm_head"],
                            quantization_status="compressed").model_dump()
    return out, qc, deq


def fp8_weights(state: dict, per_channel: bool, input_scale: bool, scale_shape=()):
    """FP8 e4m3 weights with per-tensor (one per projection) or per-channel float32 scales."""
    out, deq = dict(state), dict(state)
    for name in linear_names(state):
        w = state[name + ".weight"].float()
        amax = w.abs().amax(1, keepdim=True) if per_channel else w.abs().amax().reshape(1, 1)
        s = amax / 448.0
        wq = (w / s).clamp(-448, 448).to(FP8)
        deq[name + ".weight"] = wq.float() * s
        out[name + ".weight"] = wq
        out[name + ".weight_scale"] = s.reshape(-1, 1) if per_channel else s.reshape(scale_shape)
        if input_scale:
            out[name + ".input_scale"] = torch.tensor(0.02).reshape(scale_shape)
    return out, deq


def fp8_vllm(state: dict, static: bool):
    out, deq = fp8_weights(state, per_channel=False, input_scale=static)
    return out, {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}, deq


def fbgemm(state: dict):
    out, deq = fp8_weights(state, per_channel=True, input_scale=False)
    return out, {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}, deq


def compressed_fp8(state: dict, per_channel: bool, static: bool):
    out, deq = fp8_weights(state, per_channel, input_scale=static, scale_shape=(1,))
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor" if static else "token",
            "dynamic": not static}
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
          "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": acts,
                                        "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                    "strategy": "channel" if per_channel else "tensor",
                                                    "dynamic": False}}}}
    return out, qc, deq


def write(directory: Path, tensors: dict, qc: dict | None) -> None:
    """Replace the model's weights with `tensors` and add quantization_config to its config.json."""
    directory = Path(directory)
    for f in directory.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    cfg = json.loads((directory / "config.json").read_text())
    if qc is not None:
        cfg["quantization_config"] = qc
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
