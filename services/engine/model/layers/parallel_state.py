"""The tensor-parallel group as the layers see it: rank, size and the collectives (None = one device)."""

from __future__ import annotations

import torch


def rank_and_size(tp) -> tuple[int, int]:
    return (tp.rank, tp.world_size) if tp is not None else (0, 1)


def all_reduce(tp, x: torch.Tensor) -> torch.Tensor:
    return x if tp is None else tp.all_reduce(x)


def split(total: int, tp, what: str) -> int:
    """This rank's share of `total` (heads, FFN rows, ...); refuses an uneven split by name."""
    rank, n = rank_and_size(tp)
    if total % n:
        raise ValueError(f"tensor_parallel_size {n} must divide the model's {what} ({total})")
    return total // n
