"""Models, built from a ``model`` config node by Hydra's instantiation (its ``_target_``, see
:mod:`cl_runner.build`); every model ends in an ``nn.Linear`` called ``head``."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cl_runner.build import options, partial, unknown_options
from cl_runner.models.cifar import ConvNet, ResNet18
from cl_runner.models.cnn import SmallCNN
from cl_runner.models.mlp import MLP

__all__ = ["MLP", "SmallCNN", "ConvNet", "ResNet18", "build_model"]  # the classes configs name in _target_

_LARGEST_SIDE = 256  # how far the "what fits" search looks


def _construct(make: functools.partial, shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """Build the model and run one forward pass on zeros in eval mode (no batch-norm update)."""
    model = make(tuple(shape), n_outputs)
    with torch.no_grad():
        model.eval()(torch.zeros(2, *shape))
    return model.train()


def _smallest_fit(make: functools.partial, shape: tuple[int, ...], n_outputs: int) -> int | None:
    c, h, w = shape
    for side in range(max(h, w) + 1, _LARGEST_SIDE + 1):
        try:
            _construct(make, (c, side, side), n_outputs)
            return side
        except RuntimeError:
            continue
    return None


def build_model(cfg: Mapping[str, Any], input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """The model of ``cfg`` for inputs of ``input_shape``; ValueError (one line) for an unknown model,
    a bad option, or a model that cannot take the benchmark's input shape."""
    name = cfg.get("name")
    make = partial(cfg, "model")
    bad = unknown_options(make.func, options(cfg), skip=("input_shape", "n_outputs"))
    if bad:
        raise ValueError(
            f"model {name} has no option {', '.join(bad)}; valid options: {', '.join(bad.valid) or 'none'}"
        )
    try:
        return _construct(make, tuple(input_shape), n_outputs)
    except (TypeError, ValueError) as e:  # unknown option or a value of the wrong type
        raise ValueError(str(e) if str(e).startswith("model.") else f"model {name}: {e}") from None
    except RuntimeError as e:  # the input is too small for the model's kernels / pooling
        shape = "×".join(map(str, input_shape))
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        side = _smallest_fit(make, tuple(input_shape), n_outputs) if len(input_shape) == 3 else None
        fits = (
            f"it needs images of at least {side}×{side}: set benchmark.pad={side} or more"
            if side
            else "choose a benchmark with larger images"
        )
        raise ValueError(
            f"model={name} does not fit the benchmark's input shape {shape} ({reason}); {fits}, or use model=mlp"
        ) from None
