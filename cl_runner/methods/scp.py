"""SCP, Sliced Cramér Preservation (Kolouri, Ketz, Soltoggio, Pilly 2020, "Sliced Cramér Synaptic
Consolidation for Preserving Deeply Learned Representations", ICLR): importance from how much the
mean network output moves along random directions in output space.

Importance of task t, at the end of t (eval mode, outputs restricted to the task's active units
``task.units = (lo, hi)``, K = hi − lo):

    f̄(θ) = 1/N Σ_n f(x_n; θ)[lo:hi]                      (mean output over the task's data)
    Γ_t,i = 1/L Σ_l ( ∂ ξ_lᵀ f̄(θ) / ∂θ_i )²,   ξ_l ~ uniform on the unit sphere S^{K−1}

with L = ``n_slices`` directions drawn from a generator seeded by the run's seed and the task id
(``cl_runner.seeding.task_generator``; the global RNG is not touched); x_n: the task's training data (all,
or a seeded subset of ``scp_samples``). Γ is the Monte-Carlo estimate of the sliced Cramér
distance's quadratic form (the paper's eq. for Γ), 1/L Σ_l (ξ_lᵀ J)² with J = ∂f̄/∂θ (K × P).

Accumulation over tasks: ``decay: null`` (default): Γ ← Γ + Γ_t (summed, as MAS, SI here);
``decay: α`` in [0, 1): Γ ← α Γ + (1 − α) Γ_t (the paper's online option, the authors' code's
``alpha``, 0.5 there). Single anchor θ* = the parameters at the end of the latest task. Penalty (no ½):

    L(θ) = L_t(θ) + λ · Σ_i Γ_i (θ_i − θ*_i)²

Choices against the authors' public code (``SCP.consolidate``): the paper's f̄ is the mean over the
whole task; their code takes the mean per data-loader mini-batch, sums the squared gradients over
batches and slices and divides by N (a different scale, and per-batch means). Here: the paper's
whole-task mean and mean over slices. Computation: J is accumulated over chunks of ``scp_batch``
samples (f̄ is linear in the per-sample outputs) with one batched backward per chunk over
min(K, L) output directions (``is_grads_batched``), then Γ = mean over l of (Ξ J)²; the result does
not depend on the chunk size. ``importance()``: the accumulated Γ.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cl_runner.data.stream import Task
from cl_runner.methods.base import eval_mode, named_params
from cl_runner.methods.checks import check_count, check_range
from cl_runner.methods.regularizer import QuadraticPenalty, snapshot
from cl_runner.seeding import choose_subset, task_generator


def random_slices(n_slices: int, k: int, generator: torch.Generator) -> Tensor:
    """(L, K) directions uniform on the unit sphere: normalized standard normals (CPU generator)."""
    xi = torch.randn(n_slices, k, generator=generator, dtype=torch.float64)
    return (xi / xi.norm(dim=1, keepdim=True)).float()


def sliced_importance(
    model: nn.Module, x: Tensor, units: tuple[int, int], slices: Tensor, batch: int = 1024
) -> dict[str, Tensor]:
    """Γ_i = 1/L Σ_l (∂ ξ_lᵀ f̄ / ∂θ_i)² for the rows ξ_l of ``slices`` (L, K), f̄ the mean of the
    active outputs over ``x``. Eval mode is the caller's job; ``.grad`` is not touched."""
    lo, hi = units
    params = named_params(model)
    n_slices, k = slices.shape
    slices = slices.to(x.device)
    # project onto the directions directly when there are fewer of them than outputs
    rows = slices if n_slices <= k else torch.eye(k, device=x.device)
    jac = {n: torch.zeros(len(rows), *p.shape, device=p.device) for n, p in params.items()}
    for s in range(0, len(x), batch):
        with torch.enable_grad():
            total = model(x[s : s + batch])[:, lo:hi].sum(0)  # (K,), Σ over the chunk's samples
            grads = torch.autograd.grad(
                total, list(params.values()), grad_outputs=rows, is_grads_batched=True, allow_unused=True
            )
        for (n, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                jac[n] += g
    out = {}
    for n, j in jac.items():
        j = j.reshape(len(rows), -1) / max(len(x), 1)  # rows of ∂f̄/∂θ (or of ξᵀ∂f̄/∂θ)
        proj = j if n_slices <= k else slices @ j  # (L, P): ξ_lᵀ J
        out[n] = proj.square().mean(0).reshape(params[n].shape)
    return out


class SCP(QuadraticPenalty):
    name = "scp"

    def __init__(self, strength: float, n_slices: int, decay: float | None, scp_samples: int | None, scp_batch: int):
        super().__init__(strength, half=False)
        self.n_slices = check_count("n_slices", n_slices)
        self.decay = None if decay is None else check_range("decay", decay, 0.0, 1.0)
        if self.decay == 1.0:
            raise ValueError("method.decay=1.0 must be null (sum over tasks) or a number in [0, 1)")
        self.scp_samples = check_count("scp_samples", scp_samples, allow_none=True)
        self.scp_batch = check_count("scp_batch", scp_batch)
        self._gamma: dict[str, Tensor] = {}

    def task_importance(self, model: nn.Module, task: Task) -> dict[str, Tensor]:
        """Γ_t of ``task`` at the model's current parameters (eval mode, state kept)."""
        generator = task_generator(self.seed, task.id)
        x = task.x_train
        idx = choose_subset(len(x), self.scp_samples, generator)
        if idx is not None:
            x = x[idx.to(x.device)]
        lo, hi = task.units
        slices = random_slices(self.n_slices, hi - lo, generator)
        with eval_mode(model):
            return sliced_importance(model, x, task.units, slices, self.scp_batch)

    def after_task(self, model: nn.Module, task: Task) -> None:
        new = self.task_importance(model, task)
        if not self._gamma:
            self._gamma = new if self.decay is None else {n: (1 - self.decay) * g for n, g in new.items()}
        elif self.decay is None:
            self._gamma = {n: self._gamma[n] + g for n, g in new.items()}
        else:
            self._gamma = {n: self.decay * self._gamma[n] + (1 - self.decay) * g for n, g in new.items()}
        self.set_terms([(snapshot(model), self._gamma)])

    def importance(self) -> dict[str, Tensor]:
        return dict(self._gamma)
