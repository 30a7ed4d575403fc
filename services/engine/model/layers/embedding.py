"""Token embeddings and the LM head split by vocabulary over tensor-parallel ranks, learned absolute
positions, and the logits step (scaling, soft-capping, gathering the vocabulary shards)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine.model.layers import dense_dispatch
from services.engine.model.layers.linear import expect_dim, load_checked, replicated_loader
from services.engine.model.layers.parallel_state import all_reduce, rank_and_size


class VocabParallelEmbedding(torch.nn.Module):
    """Rank r holds vocabulary rows [r * shard, (r + 1) * shard); the vocabulary is padded with zero rows
    up to a multiple of the group size (those ids are never looked up; their logits are cut)."""

    def __init__(self, vocab_size: int, hidden: int, tp=None):
        super().__init__()
        self.tp = tp
        self.rank, self.tp_size = rank_and_size(tp)
        self.vocab_size = vocab_size
        self.shard = -(-vocab_size // self.tp_size)
        self.start = self.rank * self.shard
        self.weight = torch.nn.Parameter(torch.empty(self.shard, hidden), requires_grad=False)
        self.weight.weight_loader = self.load

    def load(self, param, ckpt, shard_id=None):
        expect_dim(ckpt, 0, self.vocab_size)
        stop = min(self.start + self.shard, self.vocab_size)
        param.data[stop - self.start:].zero_()
        load_checked(param.data[:stop - self.start], ckpt.narrow(0, self.start, stop - self.start), ckpt)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return F.embedding(input_ids, self.weight)
        # Each rank looks up the ids in its slice and zeros the rest; the sum over ranks is exact.
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.shard)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(self.tp, x.masked_fill(outside[:, None], 0))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, split like the embedding; `tie_to` shares the embedding's tensor."""

    def __init__(self, vocab_size: int, hidden: int, tp=None, bias: bool = False, tie_to: VocabParallelEmbedding | None = None):
        super().__init__(vocab_size, hidden, tp)
        if tie_to is not None:
            self.weight = tie_to.weight
        self.bias = torch.nn.Parameter(torch.empty(self.shard), requires_grad=False) if bias else None
        if bias:
            self.bias.weight_loader = self.load_bias

    def load_bias(self, param, ckpt, shard_id=None):
        expect_dim(ckpt, 0, self.vocab_size)
        stop = min(self.start + self.shard, self.vocab_size)
        param.data[stop - self.start:].zero_()
        load_checked(param.data[:stop - self.start], ckpt.narrow(0, self.start, stop - self.start), ckpt)


class LogitsProcessor(torch.nn.Module):
    """hidden (after the final norm) -> float32 logits over the whole vocabulary: the LM head, then
    `scale` (Cohere's logit_scale, Granite's 1 / logits_scaling), then `soft_cap` * tanh(x / soft_cap) (Gemma 2)."""

    def __init__(self, vocab_size: int, scale: float = 1.0, soft_cap: float | None = None, tp=None):
        super().__init__()
        self.vocab_size, self.scale, self.soft_cap, self.tp = vocab_size, scale, soft_cap, tp

    def forward(self, head: ParallelLMHead, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """float32=False: the logits in the head's dtype (the engine's sampler upcasts only where it needs to)."""
        logits = dense_dispatch.linear(hidden, head.weight, head.bias)
        if self.tp is not None:  # each rank has its vocabulary slice: gather them, drop the padding
            logits = self.tp.all_gather_columns(logits)
        logits = logits[:, :self.vocab_size]
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        return logits.float() if float32 else logits


class PositionEmbedding(torch.nn.Module):
    """Learned absolute positions (GPT-2, OPT...), replicated on every rank; `offset` shifts the index (OPT: 2)."""

    def __init__(self, num_positions: int, hidden: int, offset: int = 0):
        super().__init__()
        self.offset = offset
        self.weight = torch.nn.Parameter(torch.empty(num_positions + offset, hidden), requires_grad=False)
        self.weight.weight_loader = replicated_loader

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions + self.offset, self.weight)
