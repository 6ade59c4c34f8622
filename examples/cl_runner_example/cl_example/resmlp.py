"""A residual MLP (resmlp): the example extension's model. Flattens its input; ``depth`` blocks
x ← x + tanh(W x + b) of ``width`` units after an input layer; the output layer is an ``nn.Linear``
called ``head`` (cl-runner's scenarios choose its units). The constructor takes the benchmark's input
shape and output count, then one keyword per option (configs/model/resmlp.yaml)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cl_runner.options import Int, check


class ResidualMLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], n_outputs: int, width: int, depth: int):
        super().__init__()
        width = check("model.width", width, Int(lo=1, hi=1 << 16))
        depth = check("model.depth", depth, Int(lo=0, hi=64))
        self.inp = nn.Linear(math.prod(input_shape), width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x.flatten(1)))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)
