"""compressed-tensors checkpoints (what llm-compressor writes): config groups that target layers, each with
a scheme. Folio reads two kinds of scheme:

  W4A16, format "pack-quantized": weight_packed [N, ceil(K/8)] int32 (column 8p+i in bits 4i, value + 8),
    weight_scale [N, G], weight_zero_point [ceil(N/8), G] int32 when asymmetric (packed along the output,
    value + 8), weight_shape [2], weight_g_idx [K] with act-order "group". w = (q - zero) * scale.
  FP8, format "float-quantized" / "naive-quantized": weight [N, K] e4m3, weight_scale [1] (tensor) or [N, 1]
    (channel); input activations dynamic per token, static per tensor (input_scale [1]) or none (W8A16).
"""

from __future__ import annotations

import torch

from services.engine.model.layers.linear import RowParallelLinear, weight_param
from services.engine.model.quantization.base import QuantConfig, all_or_none, check_divides, matches
from services.engine.model.quantization.fp8 import FP8Method, check_fp8_device
from services.engine.model.quantization.int4 import Int4Layout, act_order_perm, unpack_cols

INT4_FORMATS = ("pack-quantized",)
FP8_FORMATS = ("float-quantized", "naive-quantized")


class CompressedTensorsConfig(QuantConfig):
    name = "compressed-tensors"

    @classmethod
    def from_config(cls, qc: dict, source: str) -> "CompressedTensorsConfig":
        self = cls()
        self.source = source
        sparsity = qc.get("sparsity_config")
        if sparsity:
            raise ValueError(f"{source}: quantization_config.sparsity_config: sparse compressed-tensors checkpoints "
                             f"are not supported")
        self.format = self.field(qc, "format", str, None)
        groups = self.field(qc, "config_groups", dict, {})
        if not groups:
            raise ValueError(f"{source}: quantization_config.config_groups is empty: nothing says how weights are stored")
        self.groups = [(name, self._scheme(name, g)) for name, g in groups.items()]
        self.ignore = list(self.field(qc, "ignore", list, []) or [])
        self.uses_fp8 = any(s["kind"] == "fp8" for _, s in self.groups)
        return self

    def _scheme(self, name: str, g) -> dict:
        where = f"{self.source}: quantization_config.config_groups.{name}"
        if not isinstance(g, dict) or not isinstance(g.get("targets"), list):
            raise ValueError(f"{where}.targets must be a list of layer names, patterns or 'Linear'")
        w, a = g.get("weights") or {}, g.get("input_activations")
        fmt = g.get("format") or self.format
        bits, wtype, strategy = w.get("num_bits"), w.get("type", "int"), w.get("strategy")
        if bits == 4 and wtype == "int" and a is None:
            if fmt not in INT4_FORMATS:
                raise ValueError(f"{where}.format {fmt!r}: 4-bit weights are read in {INT4_FORMATS} only")
            if strategy not in ("group", "channel"):
                raise ValueError(f"{where}.weights.strategy {strategy!r}: W4A16 needs 'group' or 'channel'")
            gs = w.get("group_size") if strategy == "group" else -1
            if strategy == "group" and (not isinstance(gs, int) or isinstance(gs, bool) or gs < 1):
                raise ValueError(f"{where}.weights.group_size must be a positive integer, got {gs!r}")
            actorder = w.get("actorder")
            if actorder not in (None, "group", "weight", "static"):
                raise ValueError(f"{where}.weights.actorder {actorder!r}: expected null, 'group' or 'weight'")
            return {"kind": "int4", "targets": g["targets"], "group_size": gs, "sym": bool(w.get("symmetric", True)),
                    "g_idx": actorder == "group"}
        if bits == 8 and wtype == "float":
            if fmt not in FP8_FORMATS:
                raise ValueError(f"{where}.format {fmt!r}: FP8 weights are read in {FP8_FORMATS}")
            if strategy not in ("tensor", "channel"):
                raise ValueError(f"{where}.weights.strategy {strategy!r}: FP8 weights need 'tensor' or 'channel' "
                                 f"(block-wise is not supported)")
            static = False
            if a is not None:
                if a.get("num_bits") != 8 or a.get("type") != "float":
                    raise ValueError(f"{where}.input_activations: with FP8 weights, activations must be FP8 or none")
                static = not a.get("dynamic", False)
                if static and a.get("strategy") != "tensor":
                    raise ValueError(f"{where}.input_activations.strategy {a.get('strategy')!r}: static activation "
                                     f"scales must be per tensor")
            return {"kind": "fp8", "targets": g["targets"], "per_channel": strategy == "channel", "static": static}
        raise ValueError(f"{where}: weights {bits}-bit {wtype} with input_activations {a!r} is not a scheme Folio "
                         f"runs (supported: W4A16 int pack-quantized, FP8 weights with FP8 or no activations)")

    def check_device(self, device):
        if self.uses_fp8:
            check_fp8_device(self.name, device)

    def method_for(self, prefix, ckpt_names, layer):
        if all_or_none(prefix, ckpt_names, lambda n: any(matches(n, p) for p in self.ignore), "ignore"):
            return None
        for name, s in self.groups:
            hit = all_or_none(prefix, ckpt_names,
                              lambda n: any(t == "Linear" or matches(n, t) for t in s["targets"]),
                              f"config_groups.{name}.targets")
            if hit:
                if s["kind"] == "fp8":
                    return FP8Method(prefix, per_channel=s["per_channel"], static_input=s["static"])
                return PackQuantizedMethod(s, prefix)
        return None


class PackQuantizedMethod(Int4Layout):
    def __init__(self, scheme: dict, prefix: str):
        self.s, self.prefix = scheme, prefix

    def create_weights(self, layer, k: int, n: int) -> None:
        s, p = self.s, self.prefix
        whole_k = s["group_size"] == -1
        g = k if whole_k else s["group_size"]
        check_divides(p, "config_groups.*.weights.group_size", g, k, "input features on this rank")
        if not s["sym"]:
            for part in layer.output_parts:
                check_divides(p, "weights.symmetric (zero points packed 8 per int32 along the output)", 8, part,
                              "output features")
        if isinstance(layer, RowParallelLinear) and layer.tp_size > 1 and (s["g_idx"] or k % 8):
            raise ValueError(f"{p}: act-order or a packing that straddles ranks with tensor_parallel_size > 1 "
                             f"is not supported for compressed-tensors W4A16")
        in_dim = None if whole_k else 1
        layer.weight_packed = weight_param(torch.empty(n, -(-k // 8), dtype=torch.int32), out_dim=0, in_dim=1, in_pack=8)
        layer.weight_scale = weight_param(torch.empty(n, k // g), out_dim=0, in_dim=in_dim, in_pack=g)
        if not s["sym"]:
            layer.weight_zero_point = weight_param(torch.empty(n // 8, k // g, dtype=torch.int32), out_dim=0, out_pack=8,
                                                   in_dim=in_dim, in_pack=g)
        layer.weight_shape = weight_param(torch.zeros(layer.num_shards, 2, dtype=torch.int64), per_shard=True)
        if s["g_idx"]:
            layer.weight_g_idx = weight_param(torch.empty(layer.num_shards, k, dtype=torch.int32), in_dim=0,
                                              per_shard=True)
        self.group_size = g

    def process_after_loading(self, layer) -> None:
        p, k, n = self.prefix, layer.in_features, layer.out_features
        full_k = k * (layer.tp_size if isinstance(layer, RowParallelLinear) else 1)
        full_parts = getattr(layer, "full_sizes", [n * (1 if isinstance(layer, RowParallelLinear) else layer.tp_size)])
        for i, row in enumerate(layer.weight_shape.data.tolist()):
            if row != [full_parts[i], full_k]:
                raise ValueError(f"{p}: weight_shape says {row}, the layer is [{full_parts[i]}, {full_k}] (config.json)")
        q = unpack_cols(layer.weight_packed.data, k).t()  # [K, N]
        scales = layer.weight_scale.data.t()
        if self.s["sym"]:
            zeros = torch.full_like(scales, 8, dtype=torch.int32)
        else:
            zeros = unpack_cols(layer.weight_zero_point.data.t(), n)  # stored [N/8, G], packed along N -> [G, N]
        perm = None
        if self.s["g_idx"]:
            gi = layer.weight_g_idx.data
            if not bool((gi == gi[0]).all()):
                raise ValueError(f"{p}: the fused projections' weight_g_idx differ; Folio needs one input order")
            perm = act_order_perm(p, gi[0].long(), self.group_size)
        self.install(layer, q, scales, zeros, self.group_size, perm)
