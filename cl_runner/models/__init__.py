"""Models by name (``model.name``); every model ends in an ``nn.Linear`` called ``head``."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from cl_runner.models.cifar import ConvNet, ResNet18
from cl_runner.models.cnn import SmallCNN
from cl_runner.models.mlp import MLP

MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": SmallCNN, "convnet": ConvNet, "resnet18": ResNet18}


def build_model(cfg: Mapping[str, Any], input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    options = {k: v for k, v in dict(cfg).items() if k != "name"}
    name = cfg.get("name")
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is unknown; choose one of: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](tuple(input_shape), n_outputs, **options)
    except (TypeError, ValueError) as e:  # unknown option or a value of the wrong type
        raise ValueError(f"model {name}: {e}") from None
