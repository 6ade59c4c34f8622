"""The method interface (contract v2): what a continual-learning method may do to the training of a
task stream.

The trainer calls, once, ``method.setup(model, stream, seed)``, then for every task t::

    method.before_task(model, task)
    data = method.training_data(stream, t)          # what to train on (joint: the union of tasks)
    for every step:
        batch = Batch(x, y, units, sample_units, task=t)   # indexed from ``data``
        batch = method.training_batch(batch)        # may return a larger batch (replay: + memory)
        logits = model(batch.x)
        loss = cross_entropy over the active units of each sample (batch.units / batch.sample_units)
        extra = method.loss(batch, logits)          # an extra loss term, or None (distillation)
        (loss + extra).backward()
        method.after_backward(model, batch)         # .grad holds ∇(loss + extra) only, no penalty;
                                                    # a method may rewrite it (natural gradient)
        method.add_penalty_grad(model)              # .grad += ∇(λ·penalty); returns λ·penalty
        optimizer.step()
        method.after_step(model, batch)             # e.g. SI's path integral, a memory update
    method.after_task(model, task)                  # importance, anchors: for the next tasks, so
                                                    # not called after the stream's last task
    scorer = method.evaluator(model, t)             # what the accuracy matrix tests (default: the
                                                    # model; iCaRL: nearest mean of exemplars)

Who may change what: ``training_batch`` returns a new :class:`Batch` and must not modify the tensors
of the one it was given (they are views of the task's data); ``loss`` and ``after_step`` read the
batch; only ``after_backward`` and ``add_penalty_grad`` write ``.grad``; no hook but the optimizer
writes the parameters. ``batch`` is optional in ``after_backward``/``after_step`` so that a method
can be driven by hand (tests); methods that need it say so.

``strength`` is the run's λ (top-level ``lambda``). A method's importance pass must run in eval
mode and leave parameters (the same objects), buffers, training mode, gradients and the global RNG
as it found them (use :func:`eval_mode` and a generator from ``self.seed`` and the task id).

Checkpoints: between tasks the trainer saves :meth:`Method.state_dict` (by default every attribute
but the stream) and a resumed run restores it with :meth:`Method.load_state_dict`; a method whose
state is not in its attributes overrides both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_runner.data.stream import Task, TaskStream
from cl_runner.models.params import eval_mode, named_params

__all__ = ["Batch", "Method", "TrainingData", "cross_entropy", "eval_mode", "named_params"]


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


@dataclass
class Batch:
    """One training step's samples. ``units``: the active output range shared by all samples;
    ``sample_units`` (n, 2), when given, one range per sample (overrides ``units``); ``task``: the
    index of the task being trained."""

    x: Tensor
    y: Tensor
    units: tuple[int, int]
    sample_units: Tensor | None = None
    task: int = 0

    def __len__(self) -> int:
        return int(self.x.shape[0])


class Method:
    """No regularization: plain fine-tuning, task after task."""

    name = "finetune"
    #: False for methods that have no strength (finetune, joint): setting ``lambda`` is refused.
    uses_strength = False

    def __init__(self, strength: float = 0.0):
        self.strength = float(strength)
        self.seed = 0  # the run's seed, set by setup()

    def setup(self, model: nn.Module, stream: TaskStream, seed: int = 0) -> None:
        """Called once before the first task (and again, before loading a checkpoint, on resume).
        ``seed`` is the run's seed: importance passes draw from generators seeded by (seed, task)."""
        self.stream = stream
        self.seed = int(seed)

    def check_model(self, model: nn.Module) -> None:
        """ValueError (one line) if the method cannot work with ``model`` (e.g. a dense Fisher too large
        for it); called by cl-run's checks before any folder is made, and by methods' own setup."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the method between tasks (tensors and plain values)."""
        return {k: v for k, v in vars(self).items() if k != "stream"}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        vars(self).update(state)

    def undefined_metrics(self) -> dict[str, str]:
        """Metrics that mean nothing for this method's matrix, each with the reason (reported as null)."""
        return {}

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

    def training_batch(self, batch: Batch) -> Batch:
        """What to train on this step: the drawn batch, or a new one built from it."""
        return batch

    def task_loss(self, batch: Batch, logits: Tensor) -> Tensor:
        """The loss the step trains on before :meth:`loss`'s extra term: by default the cross-entropy
        over each sample's active units (:func:`cross_entropy`). A method that trains on another
        objective (iCaRL's binary cross-entropy, DER's loss on the current samples only) overrides it."""
        return cross_entropy(logits, batch.y, batch.units, batch.sample_units)

    def loss(self, batch: Batch, logits: Tensor) -> Tensor | None:
        """An extra loss term (without λ) given the batch and the model's logits on it, or None."""
        return None

    def after_backward(self, model: nn.Module, batch: Batch | None = None) -> None:
        pass

    def after_step(self, model: nn.Module, batch: Batch | None = None) -> None:
        pass

    def after_task(self, model: nn.Module, task: Task) -> None:
        """End of a task: what the next tasks' training needs (importance, anchors, memory). Not called
        after the stream's last task, which no later penalty reads."""

    def evaluator(self, model: nn.Module, trained: int) -> nn.Module:
        """What the test accuracies after training task ``trained`` are measured with: a module whose
        output has one score per output unit (the argmax over the active units is the prediction).
        By default the model itself; iCaRL returns its nearest-mean-of-exemplars classifier, GDumb a
        model trained from scratch on its memory. Called after every task (the last one too) and,
        with ``eval_every: epoch``, after every epoch; it must leave ``model`` as it found it."""
        return model

    def importance(self) -> dict[str, Tensor]:
        """Per-parameter importance of the latest consolidation (for histograms); empty if none."""
        return {}

    def curvature_images(self) -> dict[str, Tensor]:
        """Tag → 2-D picture in [0, 1] of the latest consolidation's curvature (e.g. a dense or KFAC
        Fisher, logged to TensorBoard after each task); empty if none."""
        return {}


def cross_entropy(logits: Tensor, y: Tensor, units: tuple[int, int], sample_units: Tensor | None = None) -> Tensor:
    """Cross-entropy over the active output units only (multi-head slice / seen-class mask); with
    ``sample_units`` (n, 2) each sample's own range."""
    if sample_units is None:
        lo, hi = units
        return F.cross_entropy(logits[:, lo:hi], y - lo)
    unit = torch.arange(logits.shape[1], device=logits.device)
    active = (unit >= sample_units[:, :1]) & (unit < sample_units[:, 1:])
    return F.cross_entropy(logits.masked_fill(~active, float("-inf")), y)
