"""Natural-gradient replay: replay (``replay.py``) whose every step is preconditioned by the inverse
Fisher of the combined batch (PROTOCOLS.md D3).

Each step trains on B = the current batch + replayed memory samples (as ``method=replay``); after
the backward pass the gradient g = ∇ L_B(θ) of the mean loss over B is replaced by

    g ← (F_B + δ·I)⁻¹ g,        F_B = 1/|B| Σ_{x ∈ B} E_{c ~ p(·|x)} [∇ log p(c|x) ∇ log p(c|x)ᵀ]

(δ = ``damping``, default 0.01), the Fisher of the model's output distribution on B, each sample's
softmax over its own units (those the task loss uses), in the representation ``fisher``:
``diag`` (δ added to the diagonal, an elementwise division), ``kfac`` (per layer A ⊗ G, solved
exactly through the eigenvectors of A and G) or ``dense`` (P × P, for small models: refused above
the limit with the parameter count). ``cl_runner/curvature/`` computes F and the solve.
``fisher_labels`` chooses how the expectation over c is taken: ``sample`` (default: one label drawn
from the softmax per sample, an unbiased estimate; one backward per step, and for ``dense`` a
|B|-row factor, solved by Woodbury), ``all`` (the exact sum over the active units: |units|
backwards), ``pred`` or ``true`` (the empirical Fisher). ``recompute_every`` = k reuses F for k
steps (default 1: every step, as D3); F is recomputed at the start of each task.

The optimizer then steps along the preconditioned gradient (plain SGD in D3: θ ← θ − η g).
Random draws (sampled labels) come from a CPU generator seeded from the run's seed, saved in the
checkpoint with the memory. No strength: ``lambda`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cl_runner import curvature
from cl_runner.curvature import FISHER_LABELS
from cl_runner.data.stream import Task, TaskStream
from cl_runner.methods.base import Batch, named_params
from cl_runner.methods.checks import check_choice, check_count, check_range
from cl_runner.methods.replay import REPLAY_STREAM, Replay
from cl_runner.seeding import task_generator

FISHERS = ("diag", "kfac", "dense")


class NGReplay(Replay):
    name = "ng_replay"

    def __init__(
        self,
        strength: float,
        buffer_size: int,
        replay_batch: int | None,
        fisher: str,
        fisher_labels: str,
        damping: float,
        recompute_every: int,
    ):
        super().__init__(strength, buffer_size, replay_batch)
        self.fisher = check_choice("fisher", fisher, FISHERS)
        self.fisher_labels = check_choice("fisher_labels", fisher_labels, FISHER_LABELS)
        self.damping = check_range("damping", damping, 0.0, float("inf"), lo_open=True)
        self.recompute_every = check_count("recompute_every", recompute_every)
        self.label_generator = torch.Generator()
        self._curvature = None  # the Fisher in use, and the steps it has served this task
        self._age = 0

    def setup(self, model: nn.Module, stream: TaskStream, seed: int = 0) -> None:
        super().setup(model, stream, seed)
        if self.fisher == "dense" and model is not None:
            curvature.check_dense(sum(p.numel() for p in named_params(model).values()))
        self.label_generator = task_generator(self.seed, REPLAY_STREAM + 1)
        self._curvature, self._age = None, 0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "label_generator": self.label_generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.label_generator.set_state(state["label_generator"])

    def before_task(self, model: nn.Module, task: Task) -> None:
        super().before_task(model, task)
        self._curvature, self._age = None, 0

    def after_backward(self, model: nn.Module, batch: Batch | None = None) -> None:
        if batch is None:
            raise ValueError("ng_replay needs the step's batch in after_backward (the Fisher is computed on it)")
        if self._curvature is None or self._age >= self.recompute_every:
            self._curvature = curvature.fisher(
                model,
                batch.x,
                batch.units,
                kind=self.fisher,
                labels=self.fisher_labels,
                y=batch.y,
                sample_units=batch.sample_units,
                generator=self.label_generator,
            )
            self._age = 0
        self._age += 1
        params = {n: p for n, p in named_params(model).items() if p.grad is not None}
        natural = self._curvature.solve({n: p.grad for n, p in params.items()}, self.damping)
        with torch.no_grad():
            for n, p in params.items():
                p.grad.copy_(natural[n])
