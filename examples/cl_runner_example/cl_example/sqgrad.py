"""Squared-gradient anchoring (sqgrad): the example extension's method. Not a published method: it is
here to show what a method written outside cl-runner does (the rules of ``cl_runner.methods.base``).

    L(θ) = L_t(θ) + λ · Σ_i Ω_i (θ_i − θ*_i)²

θ* = the parameters after the latest task. After task t (its importance pass),

    Ω ← decay · Ω + 1/B · Σ_b (∂ℓ_b/∂θ)²

ℓ_b = the cross-entropy over the task's units of mini-batch b of ``batch`` training images, B batches
covering ``samples`` images drawn without replacement (an empirical Fisher diagonal on mini-batches,
not per sample: mini-batch gradients are smaller, so λ is larger than EWC's for the same pull).

- The images are drawn by a generator of the method's own, seeded by the run's seed and the task, so
  the global random state is left alone and a resumed run draws the same ones.
- The pass runs in eval mode (``eval_mode``) and takes gradients with ``torch.autograd.grad``, so the
  parameters, their ``.grad``, the buffers and every module's training flag stay as they were.
- Its state (Ω, θ*) is plain tensors in attributes, so the default ``state_dict`` checkpoints it and
  the checkpoint loads with ``weights_only=True``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cl_runner.data.stream import Task
from cl_runner.methods import Method, eval_mode, named_params
from cl_runner.methods.base import cross_entropy
from cl_runner.options import Float, Int, check


class SquaredGradient(Method):
    name = "sqgrad"
    uses_strength = True  # λ = the run's `lambda` (the config's default: configs/method/sqgrad.yaml)

    def __init__(self, strength: float, samples: int, batch: int, decay: float):
        super().__init__(strength)
        self.samples = check("method.samples", samples, Int(lo=1))
        self.batch = check("method.batch", batch, Int(lo=1))
        self.decay = check("method.decay", decay, Float(lo=0, hi=1))
        self.omega: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def penalty(self, model: nn.Module) -> Tensor | None:
        if not self.anchor:
            return None
        params = named_params(model)
        return sum((self.omega[n] * (p - self.anchor[n]).square()).sum() for n, p in params.items())

    def after_task(self, model: nn.Module, task: Task) -> None:
        params = named_params(model)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + task.id)
        n = min(self.samples, task.n_train)
        chosen = torch.randperm(task.n_train, generator=generator)[:n].to(task.x_train.device)
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        with eval_mode(model):
            for idx in chosen.split(self.batch):
                loss = cross_entropy(model(task.x_train[idx]), task.y_train[idx], task.units)
                for k, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
                    total[k] += g.square()
        batches = math.ceil(n / self.batch)
        self.omega = {k: self.decay * self.omega.get(k, 0.0) + total[k] / batches for k in params}
        self.anchor = {k: p.detach().clone() for k, p in params.items()}

    def importance(self) -> dict[str, Tensor]:
        return dict(self.omega)
