"""One training step, written once: the trainer's loop and a stacked sweep group (cl_runner/stacked.py)
both call :class:`TrainingStep`, so a method hook added here reaches both.

A step, in the order of the method interface (cl_runner/methods/base.py):

1. :meth:`TrainingStep.batch`: the drawn samples, then the method's ``training_batch`` (replay adds
   memory samples);
2. the forward pass and :meth:`TrainingStep.loss`: the method's ``task_loss`` (cross-entropy over the
   active units by default) plus its extra ``loss`` term; ``.backward()``;
3. :meth:`TrainingStep.gradient_hooks`: the method's ``after_backward`` (it may rewrite the gradient),
   then the gradient of λ·penalty, then ``clip_grad_norm`` on the whole gradient;
4. the optimizer's step, then :meth:`TrainingStep.after_step` (SI's path integral, a memory update).

``__call__`` runs the four for one model; the stacked group runs 1, 3 and 4 per member around one
batched forward/backward of all members.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cl_runner.methods.base import Batch, Method, TrainingData


class TrainingStep:
    def __init__(self, model: nn.Module, method: Method, clip_grad_norm: float | None = None):
        self.model, self.method, self.clip_grad_norm = model, method, clip_grad_norm

    def batch(self, data: TrainingData, idx: Tensor, t: int) -> Batch:
        """The samples ``idx`` of ``data`` (task ``t``), as the method wants to train on them."""
        units = None if data.sample_units is None else data.sample_units[idx]
        return self.prepare(Batch(data.x[idx], data.y[idx], data.units, units, t))

    def prepare(self, batch: Batch) -> Batch:
        """The drawn batch as the method wants to train on it (``training_batch``)."""
        return self.method.training_batch(batch)

    def loss(self, batch: Batch, logits: Tensor) -> Tensor:
        """The method's task loss plus its extra term (not yet λ·penalty: that one enters as a gradient)."""
        loss = self.method.task_loss(batch, logits)
        extra = self.method.loss(batch, logits)
        return loss if extra is None else loss + extra

    def gradient_hooks(self, batch: Batch) -> Tensor | None:
        """After ``.backward()``, before the optimizer step: the method's gradient hook, then λ·penalty's
        gradient, then ``clip_grad_norm`` on the whole gradient (task loss + penalty, as the curvature
        demonstration's code clips after the regularized loss's backward, docs/protocols/curvature.md);
        returns λ·penalty (None without one)."""
        self.method.after_backward(self.model, batch)
        penalty = self.method.add_penalty_grad(self.model) if self.method.strength else None
        if self.clip_grad_norm is not None:
            # foreach=True: one fused kernel; no host sync (the norm stays on the device)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm, foreach=True)
        return penalty

    def after_step(self, batch: Batch) -> None:
        self.method.after_step(self.model, batch)

    def __call__(
        self, data: TrainingData, idx: Tensor, t: int, optimizer: torch.optim.Optimizer
    ) -> tuple[Tensor, Tensor | None]:
        """One whole step on the samples ``idx``; returns (loss, λ·penalty or None), on the device."""
        batch = self.batch(data, idx, t)
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch, self.model(batch.x))
        loss.backward()
        penalty = self.gradient_hooks(batch)
        optimizer.step()
        self.after_step(batch)
        return loss.detach(), penalty
