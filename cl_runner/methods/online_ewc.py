"""Online EWC (Schwarz et al. 2018, "Progress & Compress", eq. 5–6; van de Ven & Tolias 2019):
one running Fisher and one anchor instead of one per task.

After task t (Fisher F_t computed exactly as in :mod:`cl_runner.methods.ewc`, at θ*_t):

    F̃_t = γ · F̃_{t−1} + F_t          (F̃_1 = F_1; so after 3 tasks F̃ = γ² F_1 + γ F_2 + F_3)
    θ*  = θ at the end of task t      (the latest parameters only)

Penalty while training task t+1:

    λ · s · Σ_i G_i (θ_i − θ*_i)²,   s = ½ if ``half``,   G = F̃ (default) or γ·F̃ (``gamma_in_penalty``)

``gamma_in_penalty=true`` is Schwarz et al.'s and van de Ven's form (the stored F̃ is decayed once
more inside the penalty); with the default γ = 1 (Hsu et al.: Fisher summed over tasks, no decay)
the two coincide. Options as EWC plus ``gamma`` ∈ [0, 1] and ``gamma_in_penalty``. With
``fisher=kfac|dense`` F̃ is a :class:`~cl_runner.curvature.Curvature` (``scale_``/``add_``):
exact for dense (one matrix); for kfac a sum of Kronecker terms per layer, one per task seen (a
sum of Kronecker products is no Kronecker product), so its per-step cost grows with the tasks.
``importance()``: F̃ (without the extra γ).

``fisher_weight``: ``none`` (the Fisher of :mod:`~cl_runner.methods.ewc`) or ``likelihood``, mammoth's
online EWC (``models/ewc_on.py`` at c66408f, Buzzega et al. 2020): each sample's squared gradient
weighted by its likelihood,

    F_t,i = 1/N Σ_n p(ŷ_n | x_n) · (∂ log p(ŷ_n | x_n) / ∂θ_i)²,    ŷ_n per ``fisher_labels``

(mammoth: ŷ = the true label, p the softmax over the whole head, one backward per sample, the weight
``exp(−nll)`` detached). Neither the empirical Fisher (weight 1) nor the true one (Σ over all classes): a
sample the model gets wrong counts little. Mammoth divides by len(loader) · batch_size, ⌈N/B⌉·B rather
than N (P-MNIST: 60,032 instead of 60,000, a 0.05 % smaller F); cl-runner divides by N. Its penalty is
e_lambda · Σ F̃ (θ − θ*)², ``half: false``; γ = 1, so ``gamma_in_penalty`` does not matter there.
Diagonal only (``fisher: diag``, ``fisher_estimator: per_sample``, ``fisher_labels`` true | pred |
sample). Per-sample gradients by ``torch.func`` (any model; on the 784-100-100-10 MLP ≈ 26 s per 60,000
samples on one CPU thread, against ≈ 1 s for the closed form the unweighted Fisher of Linear-only models
takes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cl_runner import curvature
from cl_runner.curvature.labels import fisher_labels
from cl_runner.curvature.per_sample import split_state
from cl_runner.data.stream import Task
from cl_runner.methods.base import eval_mode
from cl_runner.methods.checks import check_bool, check_choice, check_range
from cl_runner.methods.ewc import EWC
from cl_runner.methods.regularizer import snapshot
from cl_runner.seeding import choose_subset, task_generator

FISHER_WEIGHTS = ("none", "likelihood")


class OnlineEWC(EWC):
    name = "online_ewc"
    stackable = True  # the vectorized launcher may train it stacked (cl_runner/stacked.py)

    def __init__(
        self,
        strength: float,
        half: bool,
        fisher_labels: str,
        fisher_samples: int | None,
        fisher_batch: int,
        gamma: float,
        gamma_in_penalty: bool,
        fisher_estimator: str,
        sq_grad_batch_size: int,
        sq_grad_batches: int,
        fisher: str,
        fisher_weight: str,
    ):
        super().__init__(
            strength,
            half,
            fisher_labels,
            fisher_samples,
            fisher_batch,
            fisher_estimator,
            sq_grad_batch_size,
            sq_grad_batches,
            fisher,
        )
        self.gamma = check_range("gamma", gamma, 0.0, 1.0)
        self.gamma_in_penalty = check_bool("gamma_in_penalty", gamma_in_penalty)
        self.fisher_weight = check_choice("fisher_weight", fisher_weight, FISHER_WEIGHTS)
        if self.fisher_weight == "likelihood":
            if self.fisher_kind != "diag" or self.fisher_estimator != "per_sample":
                raise ValueError(
                    "method.fisher_weight=likelihood needs method.fisher=diag and method.fisher_estimator=per_sample"
                )
            if self.fisher_labels == "all":
                raise ValueError(
                    "method.fisher_labels=all does not apply to fisher_weight=likelihood; "
                    "choose one of: true, pred, sample"
                )
        self._running: dict[str, Tensor] = {}

    def fisher(self, model: nn.Module, task: Task) -> dict[str, Tensor]:
        if self.fisher_weight == "none":
            return super().fisher(model, task)
        g = task_generator(self.seed, task.id)
        x, y = task.x_train, task.y_train
        idx = choose_subset(len(x), self.fisher_samples, g)
        if idx is not None:
            idx = idx.to(x.device)
            x, y = x[idx], y[idx]
        with eval_mode(model):
            return likelihood_weighted_fisher(model, x, y, task.units, self.fisher_labels, self.fisher_batch, g)

    def after_task(self, model: nn.Module, task: Task) -> None:
        if self.fisher_kind != "diag":
            f = self.structured_fisher(model, task)
            self._running = f if not self._running else self._running.scale_(self.gamma).add_(f)
            self._latest = self._running.diagonal()
            self._curv_terms = [(snapshot(model), self._running, self.gamma if self.gamma_in_penalty else 1.0)]
            return
        fisher = self.fisher(model, task)
        if self._running:
            self._running = {n: self.gamma * self._running[n] + f for n, f in fisher.items()}
        else:
            self._running = fisher
        weight = {n: self.gamma * f for n, f in self._running.items()} if self.gamma_in_penalty else self._running
        self.set_terms([(snapshot(model), weight)])

    def state_dict(self) -> dict:
        state = super().state_dict()
        if not isinstance(self._running, dict):
            state["_running"] = self._running.state_dict()
        return state

    def load_state_dict(self, state) -> None:
        running = state["_running"]
        if running and "kind" in running:  # a Curvature's state (fisher=kfac|dense)
            running = curvature.from_state(running)
        super().load_state_dict({**state, "_running": running})

    def importance(self) -> dict[str, Tensor]:
        return dict(self._latest) if self.fisher_kind != "diag" else dict(self._running)


def likelihood_weighted_fisher(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    units: tuple[int, int],
    labels: str,
    batch: int,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """F_i = 1/N Σ_n p(ŷ_n|x_n) (∂ log p(ŷ_n|x_n) / ∂θ_i)² over the active units ``units`` (the caller
    sets eval mode): the per-sample gradient of √p_n · log p(ŷ_n|x_n), with √p_n held constant, squared."""
    lo, hi = units
    params, consts = split_state(model)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    if len(x) == 0:
        return fisher
    target = fisher_labels(model, x, y, units, labels, generator)
    with torch.no_grad():
        logp = torch.cat([torch.log_softmax(model(x[s : s + 1024])[:, lo:hi], 1) for s in range(0, len(x), 1024)])
        root_p = logp.gather(1, target[:, None])[:, 0].mul(0.5).exp()

    def weighted_log_lik(params: dict[str, Tensor], x1: Tensor, c: Tensor, w: Tensor) -> Tensor:
        z = functional_call(model, (params, consts), (x1.unsqueeze(0),))[0, lo:hi]
        return w * torch.log_softmax(z, -1).gather(0, c.unsqueeze(0))[0]

    per_sample = vmap(grad(weighted_log_lik), in_dims=(None, 0, 0, 0))
    for s in range(0, len(x), batch):
        for name, g in per_sample(params, x[s : s + batch], target[s : s + batch], root_p[s : s + batch]).items():
            fisher[name] += g.square_().sum(0)
    return {n: f / len(x) for n, f in fisher.items()}
