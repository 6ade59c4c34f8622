"""RWalk, Riemannian Walk (Chaudhry, Dokania, Ajanthan, Torr 2018, eq. 6–8): the EWC++ Fisher plus
a path-integral score measured in the Fisher (KL) metric, both normalized, one quadratic penalty.

While training, every step k (θ_k → θ_{k+1}) with g_k = ∇ of the *task* loss (the gradient before
the penalty is added; the authors' ``vanilla_gradients``):

    ω_i   += −g_k,i · (θ_{k+1,i} − θ_k,i)            (first-order loss change, as SI)
    tmp_i += g_k,i²

and every ``update_every`` steps (Δt; the authors' ``fisher_update_after``, 10 on MNIST), with
Δθ = θ now − θ at the start of this window:

    F_i  ← (1 − α) F_i + α · tmp_i / Δt                 (EWC++, eq. 6; α = ``alpha``, the weight of
                                                         the new estimate; the authors' 0.9)
    s_i  += max(0, ω_i / (½ F_i Δθ_i² + ε))             (eq. 7; ½ F Δθ² ≈ KL(p_θ ‖ p_θ+Δθ) per
                                                         parameter; negative scores set to zero)

then ω, tmp and the window start are reset. Choices (paper vs the authors' TF code, agem model.py):

- Fisher per step: the square of the mini-batch gradient of the task loss (the authors'
  ``tf.square(d)`` of the batch loss's gradient), not a mean of per-sample squares: it comes for free
  from the training backward. Its scale does not matter for the penalty (normalized below).
- The running F is updated *before* the window's score, so eq. 7 uses F_θ^t at the current step (the
  authors score with the previous window's F; with F = 0 at the first window that makes the first
  window's score ω/ε dominate the normalized score). F starts at 0 and runs over the whole stream
  (EWC++ never resets it).
- ½ in the denominator as in eq. 7 (the authors' code drops it); ε = ``eps`` (the authors' 1e-3).
- A window still open at the end of a task is closed there (its steps count; tmp is divided by the
  window's own number of steps).

At the end of task t: the task's score s_t (reset per task) is combined with the earlier ones by
averaging, s ← ½ (s + s_t) (the paper, "to reduce the rigidity"; after the first task s = s_1, the
authors' ×2 pre-scaling; their ``assign_add`` that makes it 1.5 s + 0.5 s_t is not followed). Then
both are min–max normalized over all parameters (one min and one max over the whole network):

    F̂ = (F − min F) / (max F − min F + 1e−32),   ŝ = (s − min s) / (max s − min s + 1e−32)

Penalty (eq. 8, no ½ factor), single anchor θ* = the parameters at the end of the latest task:

    L(θ) = L_t(θ) + λ · Σ_i (F̂_i + ŝ_i) (θ_i − θ*_i)²

The paper's sample replay is not part of this method (``replay`` is its own method). Per-step work
is four multi-tensor (foreach) kernels, as SI; the window update every Δt steps likewise.
``importance()``: F̂ + ŝ of the latest consolidation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cl_runner.data.stream import Task
from cl_runner.methods.base import Batch, named_params
from cl_runner.methods.checks import check_count, check_range
from cl_runner.methods.regularizer import QuadraticPenalty, snapshot

NORM_EPS = 1e-32  # the authors' EPSILON in the min–max normalization


def normalize(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Min–max normalization to [0, 1] with one min and one max over all tensors."""
    lo = torch.stack([v.min() for v in values.values()]).min()
    hi = torch.stack([v.max() for v in values.values()]).max()
    return {n: (v - lo) / (hi - lo + NORM_EPS) for n, v in values.items()}


class RWalk(QuadraticPenalty):
    name = "rwalk"

    def __init__(self, strength: float, alpha: float, update_every: int, eps: float):
        super().__init__(strength, half=False)
        self.alpha = check_range("alpha", alpha, 0.0, 1.0, lo_open=True)
        self.update_every = check_count("update_every", update_every)
        self.eps = check_range("eps", eps, 0.0, float("inf"), lo_open=True)
        self.n_tasks = 0
        self._fisher: dict[str, Tensor] = {}  # running EWC++ Fisher F
        self._score: dict[str, Tensor] = {}  # s over the finished tasks (averaged)
        self._task_score: dict[str, Tensor] = {}  # s_t of this task
        self._omega: dict[str, Tensor] = {}  # ω of the open window
        self._sq: dict[str, Tensor] = {}  # Σ g² of the open window
        self._grad: dict[str, Tensor] = {}  # this step's task-loss gradient
        self._start: dict[str, Tensor] = {}  # θ at the start of the open window
        self._steps = 0  # steps in the open window
        self._imp: dict[str, Tensor] = {}

    def before_task(self, model: nn.Module, task: Task) -> None:
        self._start = snapshot(model)
        zeros = {n: torch.zeros_like(p) for n, p in self._start.items()}
        if not self._fisher:
            self._fisher = {n: z.clone() for n, z in zeros.items()}
        self._task_score = {n: z.clone() for n, z in zeros.items()}
        self._omega = {n: z.clone() for n, z in zeros.items()}
        self._sq = {n: z.clone() for n, z in zeros.items()}
        self._grad = {n: z.clone() for n, z in zeros.items()}
        self._steps = 0

    @torch.no_grad()
    def after_backward(self, model: nn.Module, batch: Batch | None = None) -> None:
        # .grad holds the task-loss gradient only here (the penalty is added after this hook).
        # ω_k = −g_k·(θ_{k+1} − θ_k) is added in two halves, + g_k·θ_k now and − g_k·θ_{k+1} after the
        # step: no copy of θ_k to keep (4 multi-tensor kernels a step, as SI)
        params = named_params(model)
        names = [n for n in self._grad if params[n].grad is not None]
        if len(names) < len(self._grad):  # a parameter without a gradient moves by nothing here
            torch._foreach_zero_(list(self._grad.values()))
        grads = [params[n].grad for n in names]
        torch._foreach_copy_([self._grad[n] for n in names], grads)
        torch._foreach_addcmul_([self._omega[n] for n in names], grads, [params[n].detach() for n in names])
        torch._foreach_addcmul_([self._sq[n] for n in names], grads, grads)

    @torch.no_grad()
    def after_step(self, model: nn.Module, batch: Batch | None = None) -> None:
        params = named_params(model)
        names = list(self._grad)
        current = [params[n].detach() for n in names]
        torch._foreach_addcmul_([self._omega[n] for n in names], [self._grad[n] for n in names], current, value=-1.0)
        self._steps += 1
        if self._steps == self.update_every:
            self._close_window(current)

    @torch.no_grad()
    def _close_window(self, current: list[Tensor]) -> None:
        """EWC++ update of F with this window's mean g², then the window's score (eq. 6, 7);
        ``current``: θ now, in the order of the stored names."""
        if self._steps == 0:
            return
        names = list(self._grad)
        fisher = [self._fisher[n] for n in names]
        torch._foreach_mul_(fisher, 1.0 - self.alpha)
        torch._foreach_add_(fisher, [self._sq[n] for n in names], alpha=self.alpha / self._steps)
        delta = torch._foreach_sub(current, [self._start[n] for n in names])
        denom = torch._foreach_mul(delta, delta)
        torch._foreach_mul_(denom, fisher)
        torch._foreach_mul_(denom, 0.5)
        torch._foreach_add_(denom, self.eps)
        ratio = torch._foreach_div([self._omega[n] for n in names], denom)
        torch._foreach_clamp_min_(ratio, 0.0)
        torch._foreach_add_([self._task_score[n] for n in names], ratio)
        torch._foreach_zero_([self._omega[n] for n in names])
        torch._foreach_zero_([self._sq[n] for n in names])
        torch._foreach_copy_([self._start[n] for n in names], current)
        self._steps = 0

    @torch.no_grad()
    def after_task(self, model: nn.Module, task: Task) -> None:
        params = named_params(model)
        self._close_window([params[n].detach() for n in self._grad])
        if self.n_tasks == 0:
            self._score = {n: s.clone() for n, s in self._task_score.items()}
        else:
            self._score = {n: 0.5 * (s + self._task_score[n]) for n, s in self._score.items()}
        self.n_tasks += 1
        f_hat, s_hat = normalize(self._fisher), normalize(self._score)
        self._imp = {n: f_hat[n] + s_hat[n] for n in f_hat}
        self.set_terms([(snapshot(model), self._imp)])

    def importance(self) -> dict[str, Tensor]:
        return dict(self._imp)

    def fisher(self) -> dict[str, Tensor]:
        """The running (unnormalized) EWC++ Fisher (tests, diagnostics)."""
        return dict(self._fisher)

    def scores(self) -> dict[str, Tensor]:
        """(this task's s_t so far, the combined s of the finished tasks), unnormalized."""
        return dict(self._task_score), dict(self._score)
