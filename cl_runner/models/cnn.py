"""Small convolutional network (the seeds' CNN: conv 5×5 → 5 ch, pool, conv 5×5 → 5 ch, pool,
fc 80 → 20 → outputs on 28×28 inputs). ``head_bias=False`` gives PROTOCOLS.md D3's head (fc 20 → 30
without bias, ``configs/model/cnn_d3.yaml``). ReLU before max-pool equals D3's pool-then-ReLU: both
are monotone, so they commute."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cl_runner.models.checks import count, flag, widths


class SmallCNN(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_outputs: int,
        channels: list[int] = (5, 5),
        kernel_size: int = 5,
        fc: list[int] = (20,),
        batch_norm: bool = False,
        head_bias: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = input_shape[0]
        kernel_size, batch_norm = count("kernel_size", kernel_size, 64), flag("batch_norm", batch_norm)
        head_bias = flag("head_bias", head_bias)
        for ch in widths("channels", channels):
            layers.append(nn.Conv2d(in_ch, int(ch), int(kernel_size), padding=0))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(ch)))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            in_ch = int(ch)
        layers.append(nn.Flatten())
        # registered once (inside body): a module under two names breaks functional_call's restore
        features = nn.Sequential(*layers)
        with torch.no_grad():  # eval mode: the probe must not touch batch-norm running statistics
            width = features.eval()(torch.zeros(1, *input_shape)).shape[1]
        features.train()
        fcs: list[nn.Module] = []
        for h in widths("fc", fc):
            fcs += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        self.body = nn.Sequential(features, *fcs)
        self.head = nn.Linear(width, n_outputs, bias=head_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
