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
"""

from __future__ import annotations

from torch import Tensor, nn

from cl_runner import curvature
from cl_runner.data.stream import Task
from cl_runner.methods.checks import check_bool, check_range
from cl_runner.methods.ewc import EWC
from cl_runner.methods.regularizer import snapshot


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
        self._running: dict[str, Tensor] = {}

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
