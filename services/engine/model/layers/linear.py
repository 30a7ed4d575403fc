"""Linear layers that know how they are split over tensor-parallel ranks and how checkpoint tensors land in them.

Column-parallel layers split their output rows (each rank computes a slice of the features, no
communication); row-parallel layers split their input columns (each rank a partial sum, all-reduced).
The merged variants hold several checkpoint projections in one matrix (q/k/v; gate/up), each split by
rank and placed at its offset, so one matmul serves them all.

Each layer holds a *weight method*: it creates the layer's parameters and computes x -> y with them.
`PlainWeight` is an ordinary float matrix; quantized methods (FP8, 4-bit) plug in here with their own
parameters and kernels, and the layers' sharding stays the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine.model.layers.parallel_state import all_reduce, rank_and_size, split


class PlainWeight:
    """An unquantized [out, in] matrix in the model's dtype."""

    def create_weights(self, layer: torch.nn.Module, in_features: int, out_features: int) -> None:
        layer.weight = torch.nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


def load_checked(param: torch.Tensor, loaded: torch.Tensor, ckpt) -> None:
    """Copy `loaded` (this rank's cut of checkpoint tensor `ckpt`) into `param`, refusing a shape mismatch."""
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"{ckpt.where}: tensor {ckpt.name} gives {tuple(loaded.shape)} for this rank, expected "
                         f"{tuple(param.shape)} (full shape {tuple(ckpt.shape)}; check config.json)")
    param.data.copy_(loaded)


def expect_dim(ckpt, dim: int, size: int) -> None:
    if len(ckpt.shape) <= dim or ckpt.shape[dim] != size:
        raise ValueError(f"{ckpt.where}: tensor {ckpt.name} has shape {tuple(ckpt.shape)}, expected size {size} "
                         f"in dimension {dim} (from config.json)")


def replicated_loader(param: torch.Tensor, ckpt, shard_id=None) -> None:
    """Every rank holds the whole tensor (norms, replicated layers, biases of row-parallel layers)."""
    if tuple(ckpt.shape) != tuple(param.shape):
        raise ValueError(f"{ckpt.where}: tensor {ckpt.name} has shape {tuple(ckpt.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(ckpt.load())


class LinearBase(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp, method=None):
        super().__init__()
        self.tp = tp
        self.rank, self.tp_size = rank_and_size(tp)
        self.method = method or PlainWeight()
        self.in_features, self.out_features = in_features, out_features  # this rank's

    def _make(self, bias: bool) -> None:
        self.method.create_weights(self, self.in_features, self.out_features)
        self.weight.weight_loader = self.load
        self.bias = torch.nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        if bias:
            self.bias.weight_loader = self.load


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp=None, method=None):
        super().__init__(in_features, out_features, bias, tp, method)
        self._make(bias)

    def load(self, param, ckpt, shard_id=None):
        replicated_loader(param, ckpt)

    def forward(self, x):
        return self.method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; the output stays split (the next layer is row-parallel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp=None, method=None, what="features"):
        super().__init__(in_features, split(out_features, tp, what), bias, tp, method)
        self._make(bias)

    def load(self, param, ckpt, shard_id=None):
        n = param.shape[0]
        expect_dim(ckpt, 0, n * self.tp_size)
        load_checked(param, ckpt.narrow(0, self.rank * n, n), ckpt)

    def forward(self, x):
        return self.method.apply(self, x, self.bias)


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel projections of the same input in one matrix (gate/up): checkpoint tensor
    `shard_id` i lands, split by rank, at rows sum(sizes[:i]) / tp. A checkpoint that already stores them
    fused (shard_id None) is cut into its parts first."""

    def __init__(self, in_features: int, sizes: list[int], bias: bool = False, tp=None, method=None, what="features"):
        self.local_sizes = [split(s, tp, what) for s in sizes]
        super().__init__(in_features, sum(self.local_sizes), bias, tp, method)
        self.full_sizes = list(sizes)
        self._make(bias)

    def load(self, param, ckpt, shard_id=None):
        if shard_id is None:  # pre-fused in the checkpoint: load each part from its rows
            expect_dim(ckpt, 0, sum(self.full_sizes))
            start = 0
            for i, full in enumerate(self.full_sizes):
                self._load_part(param, ckpt, i, start)
                start += full
            return
        expect_dim(ckpt, 0, self.full_sizes[shard_id])
        self._load_part(param, ckpt, shard_id, 0)

    def _load_part(self, param, ckpt, i: int, ckpt_start: int) -> None:
        n = self.local_sizes[i]
        off = sum(self.local_sizes[:i])
        load_checked(param.data.narrow(0, off, n), ckpt.narrow(0, ckpt_start + self.rank * n, n), ckpt)

    def forward(self, x):
        return self.method.apply(self, x, self.bias)


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections in one matrix, split by heads: each rank keeps its query heads and its
    KV heads (so each rank caches only its own KV heads). Shard ids "q", "k", "v"."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False, tp=None,
                 method=None):
        _, n = rank_and_size(tp)
        if num_heads % n or num_kv_heads % n:
            raise ValueError(f"tensor_parallel_size {n} must divide the model's attention heads: it has {num_heads} "
                             f"query heads and {num_kv_heads} KV heads")
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads // n, num_kv_heads // n
        super().__init__(hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias, tp,
                         method, what="attention heads")
        self.q_size, self.kv_size = self.local_sizes[0], self.local_sizes[1]

    def load(self, param, ckpt, shard_id=None):
        super().load(param, ckpt, None if shard_id is None else "qkv".index(shard_id))

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


def per_head_qkv_to_blocks(t: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """Rows laid out per group as [q heads..., k, v] (GPT-NeoX / BLOOM: one q head per group; Falcon's new
    layout: several) -> [all q; all k; all v], the order QKVParallelLinear loads a fused tensor in."""
    rest = t.shape[1:]
    g = t.reshape(groups, -1, head_dim, *rest)
    q, k, v = g[:, :-2], g[:, -2], g[:, -1]
    return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)])


class RowParallelLinear(LinearBase):
    """Input features split over ranks; each rank's partial product is summed by an all-reduce, then
    the bias (held whole by every rank) is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp=None, method=None, what="features"):
        super().__init__(split(in_features, tp, what), out_features, bias, tp, method)
        self.method.create_weights(self, self.in_features, self.out_features)
        self.weight.weight_loader = self.load
        self.bias = torch.nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        if bias:
            self.bias.weight_loader = replicated_loader

    def load(self, param, ckpt, shard_id=None):
        n = param.shape[1]
        expect_dim(ckpt, 1, n * self.tp_size)
        load_checked(param, ckpt.narrow(1, self.rank * n, n), ckpt)

    def forward(self, x):
        y = all_reduce(self.tp, self.method.apply(self, x, None))
        return y if self.bias is None else y + self.bias
