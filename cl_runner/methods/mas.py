"""MAS, Memory Aware Synapses (Aljundi et al. 2018, eq. 2–4 and 6): importance from the
sensitivity of the squared output norm, which needs no labels.

Importance of task t (``cl_runner.curvature.mas_importance``, eval mode, outputs
restricted to the task's active units ``task.units``):

- per_sample=true (default, Aljundi's eq. 4):  Ω_t,i = 1/N Σ_n | ∂ ‖f(x_n)‖²₂ / ∂θ_i |
- per_sample=false (Hsu et al. 2018's code):   Ω_t,i = mean over mini-batches X_b of ``mas_batch``
  samples of | ∂ mean(f(X_b)²) / ∂θ_i |   (mean over the batch's samples and units)

computed on task t's training data (all, or a seeded subset of ``mas_samples``) at the end of t.

Accumulation over tasks: summed, Ω ← Ω + Ω_t (no decay, no averaging; as Hsu et al.), with a
single anchor θ* = the parameters at the end of the latest task. Penalty (no ½ factor):

    L(θ) = L_t(θ) + λ · Σ_i Ω_i (θ_i − θ*_i)²

``mas_batch``: per_sample=true: samples per vmap chunk of the ``torch.func`` path (memory only, the
result does not depend on it); per_sample=false: the mini-batch size, which changes the result
(Hsu et al. used their training batch, 128).
``importance()``: the accumulated Ω.
"""

from __future__ import annotations

from torch import Tensor, nn

from cl_runner.curvature import mas_importance
from cl_runner.data.stream import Task
from cl_runner.methods.base import eval_mode
from cl_runner.methods.checks import check_bool, check_count
from cl_runner.methods.regularizer import QuadraticPenalty, snapshot
from cl_runner.seeding import choose_subset, task_generator


class MAS(QuadraticPenalty):
    name = "mas"
    stackable = True  # the vectorized launcher may train it stacked (cl_runner/stacked.py)

    def __init__(
        self,
        strength: float,
        per_sample: bool,
        mas_samples: int | None,
        mas_batch: int,
    ):
        super().__init__(strength, half=False)
        self.per_sample = check_bool("per_sample", per_sample)
        self.mas_samples = check_count("mas_samples", mas_samples, allow_none=True)
        self.mas_batch = check_count("mas_batch", mas_batch)
        self._omega: dict[str, Tensor] = {}

    def task_importance(self, model: nn.Module, task: Task) -> dict[str, Tensor]:
        """Ω_t of ``task`` at the model's current parameters (eval mode, state kept)."""
        x = task.x_train
        idx = choose_subset(len(x), self.mas_samples, task_generator(self.seed, task.id))
        if idx is not None:
            x = x[idx.to(x.device)]
        with eval_mode(model):
            return mas_importance(model, x, task.units, self.per_sample, self.mas_batch)

    def after_task(self, model: nn.Module, task: Task) -> None:
        new = self.task_importance(model, task)
        self._omega = {n: self._omega[n] + w for n, w in new.items()} if self._omega else new
        self.set_terms([(snapshot(model), self._omega)])

    def importance(self) -> dict[str, Tensor]:
        return dict(self._omega)
