"""The ungated feed-forward block (up projection, activation, down projection) of the GPT-style families,
with its two projections named as the checkpoint names them (c_fc / c_proj, fc1 / fc2, ...)."""

from __future__ import annotations

import torch

from services.engine.model.layers.activation import get_activation
from services.engine.model.layers.linear import ColumnParallelLinear, RowParallelLinear


class DenseMLP(torch.nn.Module):
    def __init__(self, hidden: int, inter: int, act: str, bias: bool = True, tp=None, names=("c_fc", "c_proj"),
                 source: str = "config.json"):
        super().__init__()
        self.names = names
        setattr(self, names[0], ColumnParallelLinear(hidden, inter, bias=bias, tp=tp, what="intermediate size"))
        self.act = get_activation(act, source)
        setattr(self, names[1], RowParallelLinear(inter, hidden, bias=bias, tp=tp, what="intermediate size"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.names[1])(self.act(getattr(self, self.names[0])(x)))
