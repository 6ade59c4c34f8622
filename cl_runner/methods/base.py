"""The method interface: what a continual-learning method may do to the training of a task stream.

The trainer calls, for every task t of the stream::

    method.before_task(model, task)
    data = method.training_data(stream, t)          # what to train on (joint: the union of tasks)
    for every step:
        loss = cross_entropy(model(x)[:, lo:hi], y - lo)
        loss.backward()
        method.after_backward(model)                # .grad holds the task-loss gradient only
        method.add_penalty_grad(model)              # .grad += ∇(λ·penalty); returns λ·penalty
        optimizer.step()
        method.after_step(model)                    # e.g. SI's path integral
    method.after_task(model, task)                  # importance, anchors

``strength`` is the run's λ (top-level ``lambda``). A method's importance pass must run in eval
mode and leave parameters, buffers, training mode, gradients and the global RNG as it found them
(use :func:`eval_mode` and a local ``torch.Generator``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from cl_runner.data.stream import Task, TaskStream


@dataclass
class TrainingData:
    """Tensors one task is trained on. ``units`` is the active output range shared by all samples;
    ``sample_units`` (n, 2), when given, holds a range per sample (joint training in task-IL)."""

    x: Tensor
    y: Tensor
    units: tuple[int, int]
    sample_units: Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


class Method:
    """No regularization: plain fine-tuning, task after task."""

    name = "finetune"
    #: False for methods that have no strength (finetune, joint): setting ``lambda`` is refused.
    uses_strength = False

    def __init__(self, strength: float = 0.0):
        self.strength = float(strength)

    def setup(self, model: nn.Module, stream: TaskStream) -> None:
        """Called once before the first task."""
        self.stream = stream

    def before_task(self, model: nn.Module, task: Task) -> None:
        pass

    def training_data(self, stream: TaskStream, t: int) -> TrainingData:
        task = stream[t]
        return TrainingData(task.x_train, task.y_train, task.units)

    def penalty(self, model: nn.Module) -> Tensor | None:
        """The regularizer without λ, or None when there is none (yet)."""
        return None

    def add_penalty_grad(self, model: nn.Module) -> Tensor | None:
        """Add the gradient of ``strength * penalty`` to ``.grad``; return that value (detached), or
        None when there is no penalty. Methods may override it with a fused version that must give
        the same value and gradient as autograd on :meth:`penalty`."""
        penalty = self.penalty(model)
        if penalty is None:
            return None
        penalty = self.strength * penalty
        penalty.backward()
        return penalty.detach()

    def after_backward(self, model: nn.Module) -> None:
        pass

    def after_step(self, model: nn.Module) -> None:
        pass

    def after_task(self, model: nn.Module, task: Task) -> None:
        pass

    def importance(self) -> dict[str, Tensor]:
        """Per-parameter importance of the latest consolidation (for histograms); empty if none."""
        return {}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for an importance pass; restores each module's own training flag afterwards."""
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode


def named_params(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters by name, in a stable order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
