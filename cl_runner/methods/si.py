"""SI, Synaptic Intelligence (Zenke et al. 2017, eq. 3–5), importance from the path integral.

While training task t, after every optimizer step k (θ_k → θ_{k+1}):

    ω_i += −g_i(θ_k) · (θ_{k+1,i} − θ_{k,i})          (ω reset to 0 at the start of each task)

g is the gradient of the *task* loss alone (``grad: task``, default; Zenke et al., Hsu et al.) or of
the total loss task + λ·penalty that the optimizer used (``grad: total``; van de Ven & Tolias'
code). At the end of task t, with Δ_i = θ_i(end of t) − θ_i(start of t):

    Ω_i += ω_i / (Δ_i² + ξ)        (summed over tasks; ξ = ``xi``, default 0.1)
    θ*  = θ at the end of t        (single anchor)

Penalty (no ½ factor, as Zenke's eq. 4):  L(θ) = L_t(θ) + λ · Σ_i Ω_i (θ_i − θ*_i)²

Δ is measured from the start of *this* task, i.e. from the previous anchor. ``importance()``:
the accumulated Ω.

``clip_grad_value`` (null = off): every gradient entry clamped to [−c, c] after λ·penalty's gradient
is added and before the optimizer step (``torch.nn.utils.clip_grad_value_`` on the total gradient),
as mammoth's SI does (``models/si.py`` at c66408f, Buzzega et al. 2020, c = 1). With ``grad: total``
the path integral then uses that clipped gradient, so with plain SGD (Δθ = −lr·g)
ω += −g·Δθ = lr·g², mammoth's ``small_omega += lr · grad²`` — that table's SI is ``grad: total``,
``clip_grad_value: 1``. The trainer calls this hook only when λ ≠ 0 (λ = 0 is finetune: no clipping).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cl_runner.data.stream import Task
from cl_runner.methods.base import Batch, named_params
from cl_runner.methods.checks import check_choice, check_range
from cl_runner.methods.regularizer import QuadraticPenalty, snapshot

GRADS = ("task", "total")


class SI(QuadraticPenalty):
    name = "si"
    stackable = True  # the vectorized launcher may train it stacked (cl_runner/stacked.py)

    def __init__(self, strength: float, xi: float, grad: str, clip_grad_value: float | None):
        super().__init__(strength, half=False)
        self.xi = check_range("xi", xi, 0.0, float("inf"), lo_open=True)
        self.grad = check_choice("grad", grad, GRADS)
        self.clip_grad_value = (
            None if clip_grad_value is None else check_range("clip_grad_value", clip_grad_value, 0.0, math.inf, True)
        )
        self._omega: dict[str, Tensor] = {}  # accumulated Ω
        self._w: dict[str, Tensor] = {}  # this task's path integral ω
        self._start: dict[str, Tensor] = {}
        self._prev: dict[str, Tensor] = {}
        self._task_grad: dict[str, Tensor | None] = {}

    def before_task(self, model: nn.Module, task: Task) -> None:
        self._start = snapshot(model)
        self._prev = snapshot(model)
        self._w = {n: torch.zeros_like(p) for n, p in self._start.items()}
        self._task_grad = {}

    @torch.no_grad()
    def after_backward(self, model: nn.Module, batch: Batch | None = None) -> None:
        if self.grad == "task":  # .grad holds the task-loss gradient only at this point
            grads = {n: p.grad for n, p in named_params(model).items() if p.grad is not None}
            if self._task_grad.keys() != grads.keys():
                self._task_grad = {n: torch.empty_like(g) for n, g in grads.items()}
            torch._foreach_copy_(list(self._task_grad.values()), list(grads.values()))

    @torch.no_grad()
    def add_penalty_grad(self, model: nn.Module) -> Tensor | None:
        penalty = super().add_penalty_grad(model)
        if self.clip_grad_value is not None:
            grads = [p.grad for p in named_params(model).values() if p.grad is not None]
            torch._foreach_clamp_min_(grads, -self.clip_grad_value)
            torch._foreach_clamp_max_(grads, self.clip_grad_value)
        return penalty

    @torch.no_grad()
    def after_step(self, model: nn.Module, batch: Batch | None = None) -> None:
        # multi-tensor (foreach) kernels: this runs every step
        params = named_params(model)
        grads = self._task_grad if self.grad == "task" else {n: p.grad for n, p in params.items() if p.grad is not None}
        names = [n for n in params if n in grads]
        current = [params[n].detach() for n in names]
        prev = [self._prev[n] for n in names]
        step = torch._foreach_sub(current, prev)
        torch._foreach_addcmul_([self._w[n] for n in names], [grads[n] for n in names], step, value=-1.0)
        torch._foreach_copy_(list(self._prev.values()), [params[n].detach() for n in self._prev])

    @torch.no_grad()
    def after_task(self, model: nn.Module, task: Task) -> None:
        end = snapshot(model)
        for n, theta in end.items():
            contrib = self._w[n] / ((theta - self._start[n]).square() + self.xi)
            self._omega[n] = self._omega[n] + contrib if n in self._omega else contrib
        self.set_terms([(end, dict(self._omega))])

    def importance(self) -> dict[str, Tensor]:
        return dict(self._omega)

    def path_integral(self) -> dict[str, Tensor]:
        """This task's ω so far (for tests and diagnostics)."""
        return dict(self._w)
