"""A model's trainable parameters and the eval mode of an importance pass (used by the curvature
package and by the methods, re-exported from :mod:`cl_runner.methods.base`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for an importance pass; afterwards restores each module's own training flag and
    the very ``nn.Parameter`` objects it held (the optimizer holds those: a pass through
    ``torch.func.functional_call`` that leaves a plain tensor behind would silently stop training
    that layer)."""
    modes = [m.training for m in model.modules()]
    held = [(m, name, p) for m in model.modules() for name, p in m._parameters.items()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode
        for m, name, p in held:
            if m._parameters.get(name) is not p:
                m._parameters[name] = p


def named_params(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters by name, in a stable order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
