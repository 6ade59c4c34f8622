"""Fully connected network; flattens its input, so it takes images of any shape."""

from __future__ import annotations

import math

from torch import Tensor, nn

from cl_runner.models.checks import flag, fraction, widths

INITS = ("pytorch", "xavier")


class MLP(nn.Module):
    """``in → hidden[0] → … → hidden[-1] → n_outputs`` with ReLU, optional batch norm and dropout.

    The output layer is a single ``nn.Linear`` named ``head``; the scenario decides which of its
    units are active (one slice per task = multi-head, or the seen-class mask).

    ``init``: ``pytorch`` keeps ``nn.Linear``'s own initialization (weights Kaiming-uniform with
    a = √5, i.e. U(±1/√fan_in), biases U(±1/√fan_in)); ``xavier`` re-draws every Linear weight
    Glorot-uniform, U(±√(6 / (fan_in + fan_out))), and sets every bias to 0 — mammoth's
    ``backbone.xavier`` (MNISTMLP, Buzzega et al. 2020), applied after the default one as there.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_outputs: int,
        hidden: list[int] = (400, 400),
        batch_norm: bool = False,
        dropout: float = 0.0,
        init: str = "pytorch",
    ):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"model.init={init!r} is not valid; choose one of: {', '.join(INITS)}")
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
        if init == "xavier":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
