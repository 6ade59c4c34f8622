"""Fully connected network; flattens its input, so it takes images of any shape."""

from __future__ import annotations

import math

from torch import Tensor, nn

from cl_runner.models.checks import flag, fraction, widths


class MLP(nn.Module):
    """``in → hidden[0] → … → hidden[-1] → n_outputs`` with ReLU, optional batch norm and dropout.

    The output layer is a single ``nn.Linear`` named ``head``; the scenario decides which of its
    units are active (one slice per task = multi-head, or the seen-class mask).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_outputs: int,
        hidden: list[int] = (400, 400),
        batch_norm: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        batch_norm, dropout = flag("batch_norm", batch_norm), fraction("dropout", dropout)
        for h in widths("hidden", hidden):
            layers.append(nn.Linear(width, int(h)))
            if batch_norm:
                layers.append(nn.BatchNorm1d(int(h)))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(float(dropout)))
            width = int(h)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
