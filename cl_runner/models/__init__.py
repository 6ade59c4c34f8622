"""Models by name (``model.name``); every model ends in an ``nn.Linear`` called ``head``."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from cl_runner.models.cifar import ConvNet, ResNet18
from cl_runner.models.cnn import SmallCNN
from cl_runner.models.mlp import MLP

MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": SmallCNN, "convnet": ConvNet, "resnet18": ResNet18}
_LARGEST_SIDE = 256  # how far the "what fits" search looks


def _construct(name: str, options: dict[str, Any], shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """Build the model and run one forward pass on zeros in eval mode (no batch-norm update)."""
    model = MODELS[name](tuple(shape), n_outputs, **options)
    with torch.no_grad():
        model.eval()(torch.zeros(2, *shape))
    return model.train()


def _smallest_fit(name: str, options: dict[str, Any], shape: tuple[int, ...], n_outputs: int) -> int | None:
    c, h, w = shape
    for side in range(max(h, w) + 1, _LARGEST_SIDE + 1):
        try:
            _construct(name, options, (c, side, side), n_outputs)
            return side
        except RuntimeError:
            continue
    return None


def build_model(cfg: Mapping[str, Any], input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """The model of ``cfg`` for inputs of ``input_shape``; ValueError (one line) for an unknown model,
    a bad option, or a model that cannot take the benchmark's input shape."""
    options = {k: v for k, v in dict(cfg).items() if k != "name"}
    name = cfg.get("name")
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is unknown; choose one of: {', '.join(sorted(MODELS))}")
    try:
        return _construct(name, options, tuple(input_shape), n_outputs)
    except (TypeError, ValueError) as e:  # unknown option or a value of the wrong type
        raise ValueError(str(e) if str(e).startswith("model.") else f"model {name}: {e}") from None
    except RuntimeError as e:  # the input is too small for the model's kernels / pooling
        shape = "×".join(map(str, input_shape))
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        side = _smallest_fit(name, options, tuple(input_shape), n_outputs) if len(input_shape) == 3 else None
        fits = (
            f"it needs images of at least {side}×{side}: set benchmark.pad={side} or more"
            if side
            else "choose a benchmark with larger images"
        )
        raise ValueError(
            f"model={name} does not fit the benchmark's input shape {shape} ({reason}); {fits}, or use model=mlp"
        ) from None
