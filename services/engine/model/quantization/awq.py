"""AWQ checkpoints (AutoAWQ / llm-awq, "GEMM" version): 4-bit with zero points, one group size.

On disk, per linear layer (K inputs, N outputs, G = K / group_size):
    qweight [K, N/8] int32  packed along the output, interleaved: bits 4i of word p hold column 8p + ORDER[i]
    qzeros  [G, N/8] int32  the same packing; the zero point itself (no GPTQ-style offset)
    scales  [G, N] float16
"""

from __future__ import annotations

import torch

from services.engine.model.layers.linear import weight_param
from services.engine.model.quantization.base import QuantConfig, all_or_none, check_divides, matches
from services.engine.model.quantization.int4 import Int4Layout, unpack_cols

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AWQ's GEMM kernel reads nibble i of a word as column ORDER[i] of its eight."""


def awq_columns(q_packed_order: torch.Tensor) -> torch.Tensor:
    """[R, N] values in packed (nibble) order -> columns in their true order."""
    r, n = q_packed_order.shape
    inverse = torch.argsort(torch.tensor(ORDER))  # true column j sits at nibble inverse[j]
    return q_packed_order.reshape(r, n // 8, 8)[:, :, inverse].reshape(r, n)


class AWQConfig(QuantConfig):
    name = "awq"

    @classmethod
    def from_config(cls, qc: dict, source: str) -> "AWQConfig":
        self = cls()
        self.source = source
        bits = qc.get("bits", qc.get("w_bit", 4))
        if bits != 4:
            raise ValueError(f"{source}: quantization_config.bits = {bits!r}: AWQ is 4-bit only in Folio")
        g = qc.get("group_size", qc.get("q_group_size", 128))
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"{source}: quantization_config.group_size must be a positive integer, got {g!r}")
        self.group_size = g
        if not self.field(qc, "zero_point", bool, True):
            raise ValueError(f"{source}: quantization_config.zero_point is false: Folio reads AWQ with zero points")
        version = str(self.field(qc, "version", str, "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"{source}: quantization_config.version {version!r}: Folio reads AWQ's 'gemm' packing "
                             f"only (gemv / gemv_fast / marlin lay the bits out differently)")
        self.skip = list(self.field(qc, "modules_to_not_convert", list, []) or [])
        return self

    def method_for(self, prefix, ckpt_names, layer):
        if all_or_none(prefix, ckpt_names, lambda n: any(matches(n, p) or p in n for p in self.skip),
                       "modules_to_not_convert"):
            return None
        return AWQMethod(self, prefix)


class AWQMethod(Int4Layout):
    def __init__(self, cfg: AWQConfig, prefix: str):
        self.cfg, self.prefix = cfg, prefix

    def create_weights(self, layer, k: int, n: int) -> None:
        g, p = self.cfg.group_size, self.prefix
        for part in layer.output_parts:
            check_divides(p, "bits (8 values packed per int32 along the output)", 8, part, "output features")
        check_divides(p, "group_size", g, k, "input features on this rank")
        layer.qweight = weight_param(torch.empty(k, n // 8, dtype=torch.int32), out_dim=1, out_pack=8, in_dim=0)
        layer.qzeros = weight_param(torch.empty(k // g, n // 8, dtype=torch.int32), out_dim=1, out_pack=8, in_dim=0,
                                    in_pack=g)
        layer.scales = weight_param(torch.empty(k // g, n), out_dim=1, in_dim=0, in_pack=g)

    def process_after_loading(self, layer) -> None:
        n = layer.out_features
        q = awq_columns(unpack_cols(layer.qweight.data, n))
        zeros = awq_columns(unpack_cols(layer.qzeros.data, n))
        self.install(layer, q, layer.scales.data, zeros, self.cfg.group_size, None)
