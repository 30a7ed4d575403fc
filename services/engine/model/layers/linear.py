"""Linear layers that know how they are split over tensor-parallel ranks and how checkpoint tensors land in them.

Column-parallel layers split their output rows (each rank computes a slice of the features, no
communication); row-parallel layers split their input columns (each rank a partial sum, all-reduced).
The merged variants hold several checkpoint projections in one matrix (q/k/v; gate/up), each split by
rank and placed at its offset, so one matmul serves them all.

Each layer holds a *weight method*: it creates the layer's parameters and computes x -> y with them.
`PlainWeight` is an ordinary float matrix; quantized methods (FP8, 4-bit: services/engine/model/quantization)
plug in here with their own parameters and kernels, and the layers' sharding stays the same. Each parameter
says how it lies (`weight_param`): which dimension follows the output features, which the input features,
how many features one entry covers (8 for packed 4-bit, the group size for group scales), or that it holds
one entry per checkpoint projection (`per_shard`: per-tensor scales of fused q/k/v). The layer's loader cuts
every parameter by those facts, so a method never deals with tensor parallelism itself.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch

from services.engine.model.layers import dense_dispatch
from services.engine.model.layers.parallel_state import all_reduce, rank_and_size, split


def weight_param(t: torch.Tensor, out_dim: int | None = None, in_dim: int | None = None, out_pack: int = 1,
                 in_pack: int = 1, per_shard: bool = False) -> torch.nn.Parameter:
    """A layer parameter and how the checkpoint tensor it takes lies. `out_dim` / `in_dim`: the checkpoint
    tensor's dimension that runs along output / input features (None: not split that way); `out_pack` /
    `in_pack`: features per entry along it; `per_shard`: the parameter's leading dimension has one entry per
    checkpoint projection (q, k, v), the rest is the checkpoint tensor."""
    p = torch.nn.Parameter(t, requires_grad=False)
    p.out_dim, p.in_dim, p.out_pack, p.in_pack, p.per_shard = out_dim, in_dim, out_pack, in_pack, per_shard
    return p


class PlainWeight:
    """An unquantized [out, in] matrix in the model's dtype."""

    def create_weights(self, layer: torch.nn.Module, in_features: int, out_features: int) -> None:
        layer.weight = weight_param(torch.empty(out_features, in_features), out_dim=0, in_dim=1)

    def process_after_loading(self, layer: torch.nn.Module) -> None:
        pass

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return dense_dispatch.linear(x, layer.weight, bias)


_deferred: ContextVar[bool] = ContextVar("folio_defer_linear_weights", default=False)


@contextlib.contextmanager
def deferred_weights():
    """Linear layers built inside create no parameters until `set_method` (a quantized model picks each
    layer's method by its name once the model is built, and never allocates the float matrices)."""
    token = _deferred.set(True)
    try:
        yield
    finally:
        _deferred.reset(token)


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "float8" if dtype.itemsize == 1 else "float"
    return "integer"


def check_dtype(param: torch.Tensor, loaded: torch.Tensor, ckpt) -> None:
    """Refuse a checkpoint tensor whose kind (float, float8, packed integers) is not what the parameter holds:
    a cast would load garbage silently (a float matrix where packed 4-bit words belong)."""
    if _kind(param.dtype) != _kind(loaded.dtype):
        raise ValueError(f"{ckpt.where}: tensor {ckpt.name} is {loaded.dtype}, expected {_kind(param.dtype)} "
                         f"({param.dtype}); the tensors contradict config.json's quantization_config")


def load_checked(param: torch.Tensor, loaded: torch.Tensor, ckpt) -> None:
    """Copy `loaded` (this rank's cut of checkpoint tensor `ckpt`) into `param`, refusing a shape mismatch."""
    check_dtype(param, loaded, ckpt)
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
    loaded = ckpt.load()
    check_dtype(param, loaded, ckpt)
    param.data.copy_(loaded)


def _per_shard_loader(param, ckpt, index: int | None) -> None:
    """One checkpoint projection's tensor into its row of a per-shard parameter (all rows when the
    checkpoint stores the projections fused, index None)."""
    rows = range(param.shape[0]) if index is None else [index]
    src = ckpt.load()
    check_dtype(param, src, ckpt)
    for r in rows:
        dest = param.data[r]
        if src.numel() != dest.numel():
            raise ValueError(f"{ckpt.where}: tensor {ckpt.name} has shape {tuple(ckpt.shape)}, expected "
                             f"{tuple(dest.shape)}")
        dest.copy_(src.reshape(dest.shape))


class LinearBase(torch.nn.Module):
    num_shards = 1
    """Checkpoint projections held in this layer (3 for q/k/v)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp, method=None):
        super().__init__()
        self.tp = tp
        self.rank, self.tp_size = rank_and_size(tp)
        self.method = method or PlainWeight()
        self.in_features, self.out_features = in_features, out_features  # this rank's
        self.params_dtype = torch.get_default_dtype()  # the model's dtype (built inside build_context)
        self.prefix = type(self).__name__  # the module's name in the model, set when a method is chosen by it

    @property
    def output_parts(self) -> list[int]:
        """This rank's output features of each checkpoint projection."""
        return [self.out_features]

    def _make(self, bias: bool) -> None:
        self._has_bias = bias
        if not _deferred.get():
            self.set_method(self.method)

    def set_method(self, method) -> None:
        """Create the parameters of `method` (replacing any earlier method's) and hook up their loaders."""
        for name, _ in list(self.named_parameters(recurse=False)):
            delattr(self, name)
        self.method = method
        method.create_weights(self, self.in_features, self.out_features)
        for name, p in self.named_parameters(recurse=False):
            p.weight_loader = self.load
        self.bias = weight_param(torch.empty(self.out_features), out_dim=0) if self._has_bias else None
        if self._has_bias:  # split like the output features (row-parallel: held whole, its in_dim is None)
            self.bias.weight_loader = self.load


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp=None, method=None):
        super().__init__(in_features, out_features, bias, tp, method)
        self._make(bias)

    def load(self, param, ckpt, shard_id=None):
        if param.per_shard:
            return _per_shard_loader(param, ckpt, 0)
        replicated_loader(param, ckpt)

    def forward(self, x):
        return self.method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; the output stays split (the next layer is row-parallel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp=None, method=None, what="features"):
        super().__init__(in_features, split(out_features, tp, what), bias, tp, method)
        self._make(bias)

    def load(self, param, ckpt, shard_id=None):
        if param.per_shard:
            return _per_shard_loader(param, ckpt, None if shard_id is None else 0)
        d = param.out_dim
        if d is None:
            return replicated_loader(param, ckpt)
        n = param.shape[d]
        expect_dim(ckpt, d, n * self.tp_size)
        load_checked(param, ckpt.narrow(d, self.rank * n, n), ckpt)

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
        self.num_shards = len(sizes)
        self._make(bias)

    @property
    def output_parts(self) -> list[int]:
        return list(self.local_sizes)

    def load(self, param, ckpt, shard_id=None):
        if param.per_shard:
            return _per_shard_loader(param, ckpt, shard_id)
        d, pack = param.out_dim, param.out_pack
        if d is None:
            return replicated_loader(param, ckpt)
        if shard_id is None:  # pre-fused in the checkpoint: load each part from its rows
            expect_dim(ckpt, d, sum(self.full_sizes) // pack)
            start = 0
            for i, full in enumerate(self.full_sizes):
                self._load_part(param, ckpt, i, start, d, pack)
                start += full // pack
            return
        expect_dim(ckpt, d, self.full_sizes[shard_id] // pack)
        self._load_part(param, ckpt, shard_id, 0, d, pack)

    def _load_part(self, param, ckpt, i: int, ckpt_start: int, d: int = 0, pack: int = 1) -> None:
        n = self.local_sizes[i] // pack  # the quantization method checked that pack divides every part
        off = sum(self.local_sizes[:i]) // pack
        load_checked(param.data.narrow(d, off, n), ckpt.narrow(d, ckpt_start + self.rank * n, n), ckpt)

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
        self._make(bias)

    def load(self, param, ckpt, shard_id=None):
        dest = param.data[0] if param.per_shard else param
        d = param.in_dim
        if d is None:
            if param.per_shard:
                return _per_shard_loader(param, ckpt, 0)
            return replicated_loader(param, ckpt)
        n = dest.shape[d]
        expect_dim(ckpt, d, n * self.tp_size)
        load_checked(dest, ckpt.narrow(d, self.rank * n, n), ckpt)

    def forward(self, x):
        y = all_reduce(self.tp, self.method.apply(self, x, None))
        return y if self.bias is None else y + self.bias
