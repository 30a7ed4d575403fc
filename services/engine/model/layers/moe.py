"""Mixture-of-experts layers: the router's top-k rules, the experts held as two stacked parameters and run by
the fused kernel (kernels/fused_moe.py; its torch reference on CPU), and the sparse block with an optional
gated shared expert.

Tensor parallelism: every rank holds every expert, cut along the intermediate dimension like a dense MLP
(gate/up rows split, down columns split), so each rank computes a partial sum of every token's output and one
all-reduce completes it. The down projection's bias is added once, after that all-reduce.

Checkpoints store experts one tensor per expert and projection (`experts.<e>.w1` / `gate_proj`, ...) or
stacked (`[E, 2I, H]`, gpt-oss's transposed and interleaved layout); families turn stacked layouts into the
canonical one (`CheckpointTensor` [E, 2I, H] with gate rows then up rows; [E, H, I]) in `adapt_tensor`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from services.engine.model.layers.activation import ActAndMul
from services.engine.model.layers.linear import (MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear,
                                                 replicated_loader)
from services.engine.model.layers.parallel_state import all_reduce, rank_and_size, split

ROUTINGS = ("softmax_topk", "topk_softmax", "sparsemixer")
EXPERT_ACTIVATIONS = {"silu": "silu", "swish": "silu", "swiglu_oai": "swiglu_oai"}


@dataclass(frozen=True)
class MoESpec:
    """One family's mixture-of-experts block, read from config.json once (`fields` name the keys it came from,
    for the errors)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    source: str
    fields: tuple[str, str, str]
    """config.json's keys for (num_experts, top_k, intermediate_size)."""
    routing: str = "softmax_topk"
    """softmax_topk: softmax over all experts, then the k largest (Mixtral, Qwen, OLMoE); topk_softmax: the k
    largest logits, softmax over those (gpt-oss, Granite); sparsemixer: PhiMoE's top-2 (eval form)."""
    renormalize: bool = True
    """softmax_topk only: divide the k weights by their sum (Mixtral; Qwen / OLMoE when norm_topk_prob)."""
    activation: str = "silu"
    expert_bias: bool = False
    router_bias: bool = False
    shared_intermediate_size: int = 0
    """A shared expert (every token) of this size, 0 for none (Qwen2-MoE); gated by sigmoid(x . w) if shared_gate."""
    shared_gate: bool = False
    shared_field: str = "shared_expert_intermediate_size"
    """config.json's key for the shared expert's size (for the errors)."""
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    jitter_eps: float = 0.0
    """sparsemixer's threshold (router_jitter_noise)."""

    @classmethod
    def from_config(cls, cfg, experts_key: str, inter_key: str, top_k_key: str = "num_experts_per_tok", **kw):
        def positive(key):
            v = cfg.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{cfg.source}: field {key!r} must be a positive integer, got {v!r}")
            return v

        spec = cls(positive(experts_key), positive(top_k_key), positive(inter_key), cfg.source,
                   (experts_key, top_k_key, inter_key), **kw)
        if spec.top_k > spec.num_experts:
            raise ValueError(f"{cfg.source}: field {top_k_key!r} ({spec.top_k}) must be <= {experts_key!r} "
                             f"({spec.num_experts})")
        if spec.routing not in ROUTINGS:
            raise ValueError(f"{cfg.source}: MoE routing {spec.routing!r} is not one of {ROUTINGS}")
        if spec.routing == "sparsemixer" and spec.top_k != 2:
            raise ValueError(f"{cfg.source}: field {top_k_key!r} must be 2 for PhiMoE's sparsemixer routing, "
                             f"got {spec.top_k}")
        if spec.activation not in EXPERT_ACTIVATIONS:
            raise ValueError(f"{cfg.source}: expert activation {spec.activation!r} is not supported "
                             f"(supported: {sorted(EXPERT_ACTIVATIONS)})")
        return spec


def route(logits: torch.Tensor, spec: MoESpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights float32 [T, k], expert ids int64 [T, k]), as the family's transformers
    code computes them in eval mode."""
    logits = logits.float()
    if spec.routing == "softmax_topk":
        w, ids = torch.topk(torch.softmax(logits, dim=-1), spec.top_k, dim=-1)
        if spec.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return w, ids
    if spec.routing == "topk_softmax":
        top, ids = torch.topk(logits, spec.top_k, dim=-1)
        return torch.softmax(top, dim=-1), ids
    return sparsemixer(logits, spec.jitter_eps)


def sparsemixer(scores: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's top-2 without the training-time sampling: expert 1 is the argmax, weighted by a softmax over
    the experts whose logit is within a relative 2 * jitter_eps of it; expert 2 is the argmax of the rest,
    weighted the same way among the rest."""
    def pick(masked):
        top, ind = masked.max(dim=-1, keepdim=True)
        near = ((top - scores) / scores.abs().clamp(min=top)) <= 2 * jitter_eps
        gates = torch.softmax(masked.masked_fill(~near, float("-inf")), dim=-1)
        return gates.gather(-1, ind), ind

    w1, i1 = pick(scores)
    w2, i2 = pick(scores.scatter(-1, i1, float("-inf")))
    return torch.cat([w1, w2], dim=-1), torch.cat([i1, i2], dim=-1)


class MoEGate(ReplicatedLinear):
    """The router: hidden -> one logit per expert, whole on every rank."""

    def __init__(self, hidden: int, spec: MoESpec, tp=None):
        super().__init__(hidden, spec.num_experts, bias=spec.router_bias, tp=tp)
        self.spec = spec

    def load(self, param, ckpt, shard_id=None):
        if len(ckpt.shape) < 1 or ckpt.shape[0] != self.spec.num_experts:
            raise ValueError(f"{ckpt.where}: router tensor {ckpt.name} has shape {tuple(ckpt.shape)}: "
                             f"{ckpt.shape[0] if ckpt.shape else 0} experts, but config.json's "
                             f"{self.spec.fields[0]!r} is {self.spec.num_experts}")
        replicated_loader(param, ckpt)


class FusedMoE(torch.nn.Module):
    """The experts: w13_weight [E, 2 * I/tp, H] (this rank's gate rows, then its up rows) and w2_weight
    [E, H, I/tp]; optional w13_bias [E, 2 * I/tp] and w2_bias [E, H]. forward(x, weights, ids) -> [T, H],
    all-reduced over the ranks. `fused` (set on CUDA) runs the Triton kernel, else the torch reference."""

    def __init__(self, hidden: int, spec: MoESpec, tp=None):
        super().__init__()
        self.spec, self.tp, self.hidden = spec, tp, hidden
        self.rank, self.tp_size = rank_and_size(tp)
        E = spec.num_experts
        self.inter = split(spec.intermediate_size, tp, f"expert intermediate size ({spec.fields[2]})")
        self.activation = EXPERT_ACTIVATIONS[spec.activation]
        self.w13_weight = self._param((E, 2 * self.inter, hidden), [(e, p) for e in range(E) for p in ("gate", "up")])
        self.w2_weight = self._param((E, hidden, self.inter), [(e, "down") for e in range(E)])
        self.w13_bias = self._param((E, 2 * self.inter), None) if spec.expert_bias else None
        self.w2_bias = self._param((E, hidden), None) if spec.expert_bias else None
        self.loaded: set[int] = set()
        self.fused = False

    def _param(self, shape, shard_ids):
        p = torch.nn.Parameter(torch.empty(shape), requires_grad=False)
        p.weight_loader = self.load
        if shard_ids:
            p.shard_ids = shard_ids  # every (expert, projection) must arrive, unless the stacked tensor does
        return p

    # --- loading ---------------------------------------------------------------------------------------
    def _expect(self, ckpt, dims: list[tuple[int, int, str]]) -> None:
        """dims: (dimension, full size, config field) of the checkpoint tensor."""
        for d, size, field in dims:
            if len(ckpt.shape) <= d or ckpt.shape[d] != size:
                note = getattr(ckpt, "layout_note", "")
                raise ValueError(f"{ckpt.where}: tensor {ckpt.name} has shape {tuple(ckpt.shape)}{note}, expected "
                                 f"size {size} in dimension {d} from config.json's {field!r}")

    def load(self, param, ckpt, shard_id=None) -> None:
        E, H, n, I_full = self.spec.num_experts, self.hidden, self.inter, self.spec.intermediate_size
        f_e, _, f_i = self.spec.fields
        off = self.rank * n
        if shard_id is not None:  # one expert's gate, up or down projection
            e, part = shard_id
            if e >= E:
                raise ValueError(f"{ckpt.where}: tensor {ckpt.name} is expert {e}, but config.json's {f_e!r} is {E}")
            self.loaded.add(e)
            if part == "down":
                self._expect(ckpt, [(0, H, "hidden_size"), (1, I_full, f_i)])
                param.data[e].copy_(ckpt.narrow(1, off, n))
            else:
                self._expect(ckpt, [(0, I_full, f_i), (1, H, "hidden_size")])
                param.data[e, (0 if part == "gate" else n):][:n].copy_(ckpt.narrow(0, off, n))
            return
        # Stacked over experts (canonical layout); biases too.
        self._expect(ckpt, [(0, E, f_e)])
        self.loaded.update(range(E))
        if param is self.w2_bias:
            self._expect(ckpt, [(1, H, "hidden_size")])
            param.data.copy_(ckpt.load())
        elif param is self.w2_weight:
            self._expect(ckpt, [(1, H, "hidden_size"), (2, I_full, f_i)])
            param.data.copy_(ckpt.narrow(2, off, n))
        else:  # w13 weight or bias: [E, 2I(, H)], gate rows then up rows
            self._expect(ckpt, [(1, 2 * I_full, f"2 * {f_i}")] + ([(2, H, "hidden_size")] if ckpt.shape[2:] else []))
            param.data[:, :n].copy_(ckpt.narrow(1, off, n))
            param.data[:, n:].copy_(ckpt.narrow(1, I_full + off, n))

    def check_loaded(self, name: str) -> None:
        missing = sorted(set(range(self.spec.num_experts)) - self.loaded)
        if missing:
            raise ValueError(f"model: {name}: the checkpoint has no tensors for expert(s) {missing[:8]} of the "
                             f"{self.spec.num_experts} that config.json's {self.spec.fields[0]!r} declares")

    # --- the step --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        from kernels.fused_moe import fused_moe, fused_moe_ref

        run = fused_moe if self.fused else fused_moe_ref
        out = run(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.activation, self.w13_bias,
                  alpha=self.spec.swiglu_alpha, limit=self.spec.swiglu_limit)
        out = all_reduce(self.tp, out)
        if self.w2_bias is not None:
            out = out + (topk_weights.unsqueeze(-1) * self.w2_bias[topk_ids].float()).sum(1).to(out.dtype)
        return out


class GatedMLP(torch.nn.Module):
    """A dense SwiGLU MLP (gate_proj / up_proj stacked into gate_up_proj, down_proj): the shared expert."""

    def __init__(self, hidden: int, inter: int, act: str, tp=None, source: str = "config.json",
                 field: str = "intermediate_size"):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter] * 2, tp=tp, what=field)
        self.act = ActAndMul(act, source)
        self.down_proj = RowParallelLinear(inter, hidden, tp=tp, what=field)
        for p in self.parameters():  # a shape error names the config field this block's size came from
            p.weight_loader = _naming_field(p.weight_loader, f"config.json's {field!r} is {inter}")

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class SparseMoeBlock(torch.nn.Module):
    """gate (router) -> top-k -> experts, plus the shared expert when the family has one."""

    def __init__(self, hidden: int, spec: MoESpec, tp=None, shared_act: str = "silu"):
        super().__init__()
        self.spec = spec
        self.gate = MoEGate(hidden, spec, tp)
        self.experts = FusedMoE(hidden, spec, tp)
        self.shared_expert = self.shared_expert_gate = None
        if spec.shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden, spec.shared_intermediate_size, shared_act, tp, spec.source,
                                          spec.shared_field)
            if spec.shared_gate:
                self.shared_expert_gate = ReplicatedLinear(hidden, 1, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.spec)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


def _naming_field(loader, note: str):
    def load(param, ckpt, shard_id=None):
        try:
            loader(param, ckpt, shard_id)
        except ValueError as e:
            raise ValueError(f"{e}; {note}") from None

    return load


_EXPERT_TENSOR = re.compile(r"^(.*\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def expert_target(name: str) -> tuple[str, object] | None:
    """A per-expert checkpoint tensor name -> (FusedMoE parameter, (expert, projection)); None for others."""
    m = _EXPERT_TENSOR.match(name)
    if m is None:
        return None
    prefix, e, proj = m.groups()
    part = _PART[proj]
    return f"{prefix}.{'w2' if part == 'down' else 'w13'}_weight", (int(e), part)


def restacked(ckpt, shape: tuple[int, ...], fn):
    """A stacked checkpoint tensor read whole and rearranged by `fn` into `shape` (the canonical layout)."""
    from services.engine.model.loader import CheckpointTensor

    def read(cut):
        t = fn(ckpt.load())
        return t if cut is None else t.narrow(*cut)

    t = CheckpointTensor(ckpt.name, ckpt.where, shape, read)
    t.layout_note = f" as Folio reads it (stored as {tuple(ckpt.shape)})"
    return t
