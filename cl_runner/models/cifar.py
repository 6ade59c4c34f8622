"""Networks for Split CIFAR-10/100 (32×32 colour images).

- :class:`ConvNet` (``model.name: convnet``): the 5-conv-layer network of van de Ven, Tuytelaars &
  Tolias 2022 ("Three types of incremental learning", Methods: "Network architecture"): conv layers
  with 16, 32, 64, 128, 256 channels, 3×3 kernels, padding 1, stride 1 in the first layer and 2 in the
  others (32→32→16→8→4→2), each followed by batch norm and ReLU; then two fully connected layers of
  2000 units with ReLU; then the output layer ``head``.
- :class:`ResNet18` (``model.name: resnet18``): torchvision's ResNet-18 with the usual CIFAR stem
  (3×3 stride-1 first convolution, no max-pool) and its ``fc`` replaced by ``head``; ``width``
  scales every stage (64 = torchvision's; 20 = the "reduced ResNet-18" of Lopez-Paz & Ranzato 2017,
  built from torchvision's BasicBlock).

Both end in an ``nn.Linear`` named ``head`` and take ``(input_shape, n_outputs, **options)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cl_runner.models.checks import count, flag, widths


class ConvNet(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_outputs: int,
        channels: list[int] = (16, 32, 64, 128, 256),
        fc: list[int] = (2000, 2000),
        batch_norm: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = int(input_shape[0])
        batch_norm = flag("batch_norm", batch_norm)
        for i, ch in enumerate(widths("channels", channels)):
            # the first layer keeps the resolution; each later one halves it
            layers.append(nn.Conv2d(in_ch, int(ch), 3, stride=1 if i == 0 else 2, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(ch)))
            layers.append(nn.ReLU())
            in_ch = int(ch)
        layers.append(nn.Flatten())
        features = nn.Sequential(*layers)
        with torch.no_grad():
            width = features.eval()(torch.zeros(1, *input_shape)).shape[1]
        features.train()
        fcs: list[nn.Module] = []
        for h in widths("fc", fc):
            fcs += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        self.body = nn.Sequential(features, *fcs)
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class ResNet18(nn.Module):
    # width has no default here: configs/model/resnet18.yaml holds it (20; 64 = torchvision's)
    def __init__(self, input_shape: tuple[int, ...], n_outputs: int, width: int):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, ResNet

        w = count("width", width, 4096)
        net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=1)
        if w != 64:
            # torchvision's ResNet fixes the widths at 64·2^k; rebuild the stages with width w·2^k
            net.inplanes = w
            net.layer1 = net._make_layer(BasicBlock, w, 2)
            net.layer2 = net._make_layer(BasicBlock, 2 * w, 2, stride=2)
            net.layer3 = net._make_layer(BasicBlock, 4 * w, 2, stride=2)
            net.layer4 = net._make_layer(BasicBlock, 8 * w, 2, stride=2)
            net.bn1 = nn.BatchNorm2d(w)
        # CIFAR stem: small images need no 7×7/2 convolution and no max-pool
        net.conv1 = nn.Conv2d(int(input_shape[0]), w, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.body = net
        self.head = nn.Linear(8 * w, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
