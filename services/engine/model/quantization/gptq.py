"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum): 4-bit, group size 32/64/128/-1, symmetric or not,
with or without act-order (`desc_act`, the per-row group index `g_idx`).

On disk, per linear layer (K inputs, N outputs, G = K / group_size groups):
    qweight [K/8, N] int32  row 8p+i of column n in bits 4i of qweight[p, n]
    qzeros  [G, N/8] int32  column 8p+i in bits 4i; format "gptq" (v1) stores zero - 1, "gptq_v2" the zero
    scales  [G, N] float16; g_idx [K] int32: each input row's group (act-order permutes it)
"""

from __future__ import annotations

import torch

from services.engine.model.layers.linear import RowParallelLinear, weight_param
from services.engine.model.quantization.base import QuantConfig, all_or_none, check_divides, matches
from services.engine.model.quantization.int4 import Int4Layout, act_order_perm, unpack_cols, unpack_rows


class GPTQConfig(QuantConfig):
    name = "gptq"

    @classmethod
    def from_config(cls, qc: dict, source: str) -> "GPTQConfig":
        self = cls()
        self.source = source
        bits = self.field(qc, "bits", int, 4)
        if bits != 4:
            raise ValueError(f"{source}: quantization_config.bits = {bits}: Folio runs 4-bit GPTQ only")
        self.group_size = self.field(qc, "group_size", int, 128)
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"{source}: quantization_config.group_size must be -1 or positive, got {self.group_size}")
        self.desc_act = self.field(qc, "desc_act", bool, False)
        self.sym = self.field(qc, "sym", bool, True)
        fmt = self.field(qc, "checkpoint_format", str, "gptq", choices=("gptq", "gptq_v2"))
        self.zero_offset = 1 if fmt == "gptq" else 0
        if self.field(qc, "lm_head", bool, False):
            raise ValueError(f"{source}: quantization_config.lm_head is true: a quantized LM head is not supported")
        self.skip = list(self.field(qc, "modules_to_not_convert", list, []) or [])
        return self

    def method_for(self, prefix, ckpt_names, layer):
        if all_or_none(prefix, ckpt_names, lambda n: any(matches(n, p) for p in self.skip), "modules_to_not_convert"):
            return None
        return GPTQMethod(self, prefix)


class GPTQMethod(Int4Layout):
    def __init__(self, cfg: GPTQConfig, prefix: str):
        self.cfg, self.prefix = cfg, prefix

    def create_weights(self, layer, k: int, n: int) -> None:
        cfg, p = self.cfg, self.prefix
        check_divides(p, "bits (8 values packed per int32 along the input)", 8, k, "input features")
        for part in layer.output_parts:
            check_divides(p, "bits (8 zero points packed per int32 along the output)", 8, part, "output features")
        whole_k = cfg.group_size == -1
        g = k if whole_k else cfg.group_size
        check_divides(p, "group_size", g, k, "input features on this rank")
        row_split = isinstance(layer, RowParallelLinear) and layer.tp_size > 1
        if row_split and cfg.desc_act:
            raise ValueError(f"{p}: quantization_config.desc_act (act-order) with tensor_parallel_size > 1 splits "
                             f"a row-parallel layer's groups across ranks; not supported")
        groups = k // g
        in_dim = None if whole_k else 0  # one group over all of K: every rank holds it whole
        layer.qweight = weight_param(torch.empty(k // 8, n, dtype=torch.int32), out_dim=1, in_dim=0, in_pack=8)
        layer.qzeros = weight_param(torch.empty(groups, n // 8, dtype=torch.int32), out_dim=1, out_pack=8,
                                    in_dim=in_dim, in_pack=g)
        layer.scales = weight_param(torch.empty(groups, n), out_dim=1, in_dim=in_dim, in_pack=g)
        layer.g_idx = weight_param(torch.full((layer.num_shards, k), -1, dtype=torch.int32), in_dim=0, per_shard=True)
        layer.g_idx.optional = True  # old checkpoints without act-order omit it
        self.group_size, self.row_split = g, row_split

    def process_after_loading(self, layer) -> None:
        k, p = layer.in_features, self.prefix
        q = unpack_rows(layer.qweight.data, k)
        zeros = unpack_cols(layer.qzeros.data, layer.out_features) + self.cfg.zero_offset
        if self.cfg.sym and not bool((zeros == 8).all()):
            raise ValueError(f"{p}: quantization_config.sym is true but qzeros holds zero points other than 8 "
                             f"(is checkpoint_format right? v1 'gptq' stores 7 for 8)")
        g_idx = layer.g_idx.data
        perm = None
        if bool((g_idx >= 0).all()):
            if not bool((g_idx == g_idx[0]).all()):
                raise ValueError(f"{p}: the fused projections' g_idx differ; Folio needs one input order per layer")
            gi = g_idx[0].long()
            if self.row_split:  # this rank's rows: group ids counted from its first group
                gi = gi - layer.rank * (k // self.group_size)
            perm = act_order_perm(p, gi, self.group_size)
        elif bool((g_idx >= 0).any()):
            raise ValueError(f"{p}: only some of the fused projections have g_idx")
        elif self.cfg.desc_act:
            raise ValueError(f"{p}: quantization_config.desc_act is true but the checkpoint has no g_idx")
        self.install(layer, q, layer.scales.data, zeros, self.group_size, perm)
