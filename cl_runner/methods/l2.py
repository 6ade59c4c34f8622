"""L2: every parameter pulled towards its value after the previous task, with importance 1.

    L(θ) = L_t(θ) + λ · Σ_i (θ_i − θ*_i)²          (Hsu et al. 2018's "L2"; no ½ factor)

θ* = the parameters at the end of the most recent task (a single anchor, replaced after every
task). No penalty while training the first task. ``importance()`` is empty (Ω ≡ 1).
"""

from __future__ import annotations

from torch import nn

from cl_runner.data.stream import Task
from cl_runner.methods.regularizer import QuadraticPenalty, snapshot


class L2(QuadraticPenalty):
    name = "l2"
    stackable = True  # the vectorized launcher may train it stacked (cl_runner/stacked.py)

    def __init__(self, strength: float):
        super().__init__(strength, half=False)

    def after_task(self, model: nn.Module, task: Task) -> None:
        self.set_terms([(snapshot(model), None)])
