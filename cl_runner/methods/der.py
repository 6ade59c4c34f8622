"""DER, Dark Experience Replay (Buzzega et al. 2020): a reservoir memory of past samples
with the logits the model gave them, and the current logits on memory samples pulled towards those.

    L = CE(f(x), y)  +  α · MSE(f(x'), z'),     (x', z') ~ memory

over the current batch (x, y) and ``replay_batch`` memory samples (x', z'), each term a mean: the
cross-entropy over the batch's samples, the squared error over every memory sample and every output
unit (``F.mse_loss``, mean over batch × units). As mammoth at the paper's commit (aimagelab/mammoth
c66408f, ``models/der.py``), which ran the published table:

- the stored logits z are the outputs of the step's own forward on the current batch, taken before
  the optimizer step (``outputs.data``); the batch is offered to the reservoir after the step
  (``after_step``), every sample with its logits, by algorithm R (:mod:`cl_runner.methods.memory`);
- z covers every output unit of the model, also units that were not active when it was stored (in
  class-IL with the seen-class mask, or the other heads in task-IL): mammoth's 10-unit S-MNIST head
  is trained on all units and stores all 10; the MSE runs over all units, whatever the scenario.
  With the seen-class mask (``active_units=seen``) the stored outputs of units not active yet are
  an untrained unit's, and the MSE holds old samples' outputs there: on class-IL split digits (the
  default Adam, 3 epochs, seeds 0 and 1) DER's ACC was 16.2 / 16.8 % against finetune's 18.5 /
  14.9 %, and 32.1 / 49.4 % with ``active_units=all``;
- the current batch's cross-entropy is over its active units (``batch.units``; with
  ``active_units=all`` every unit, mammoth's S-MNIST; domain-IL the shared head);
- memory samples are drawn without replacement, ``min(replay_batch, memory filled)`` of them,
  from the first step on (mammoth: ``if not self.buffer.is_empty()``), also samples of the task
  being trained; ``replay_batch`` is mammoth's ``--minibatch_size`` (null: as many as the batch).

One forward over the concatenation [batch, memory samples] instead of mammoth's two forwards: the
same outputs for models without batch statistics (mammoth's MNIST MLP; with batch norm the
statistics of a training step would be the union's). The newest mammoth and ER-ACE's authors'
code (pclucas14/AML ``methods/der.py``) compute the same loss. No strength: α is ``alpha``;
``lambda`` is refused. Random draws come from the method's own CPU generator; the memory (with
its logits) and the generator's state are in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_runner.data.stream import Task, TaskStream
from cl_runner.methods.base import Batch, Method, cross_entropy
from cl_runner.methods.checks import check_count
from cl_runner.methods.memory import ReservoirMemory, joined_units, replay_units
from cl_runner.options import Float, check
from cl_runner.seeding import task_generator

#: ``task_generator``'s task id for DER's generator (its own stream of draws)
DER_STREAM = (1 << 20) + 16


class DER(Method):
    name = "der"
    uses_strength = False
    #: memory batches drawn per step: DER one (logits), DER++ two (logits; labels)
    draws = 1

    def __init__(self, strength: float, buffer_size: int, replay_batch: int | None, alpha: float):
        super().__init__(strength)
        self.buffer_size = check_count("buffer_size", buffer_size)
        self.replay_batch = check_count("replay_batch", replay_batch, allow_none=True)
        self.alpha = float(check("method.alpha", alpha, Float(lo=0.0)))
        self._reset()

    def _reset(self) -> None:
        self.buffer = ReservoirMemory(self.buffer_size)  # x, y, task, logits
        self.generator = torch.Generator()
        self._pending: Batch | None = None  # the step's own samples, stored with their logits after the step
        self._logits: Tensor | None = None  # the current samples' logits (stored after the step)
        self._targets: Tensor | None = None  # the stored logits of the step's first memory draw
        self._sizes: list[int] = []  # rows of the step's batch: [current, memory draw 1, (draw 2)]
        self._units: Tensor | None = None

    def setup(self, model: nn.Module, stream: TaskStream, seed: int = 0) -> None:
        super().setup(model, stream, seed)
        self._reset()
        self.generator = task_generator(self.seed, DER_STREAM)

    def state_dict(self) -> dict[str, Any]:
        return {**self.buffer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer.load_state_dict(state)
        self.generator.set_state(state["generator"].cpu())  # a CPU generator, whatever the map_location

    def before_task(self, model: nn.Module, task: Task) -> None:
        self._units = replay_units(self.stream, task)

    # ------------------------------------------------------------------ the step
    def training_batch(self, batch: Batch) -> Batch:
        self._pending, self._logits = batch, None
        self._sizes = [len(batch)]
        n = self.replay_batch or len(batch)
        drawn = [self.buffer.sample(n, self.generator, batch.x.device, ("x", "y", "task", "logits"))]
        if drawn[0] is None:
            return batch
        drawn += [self.buffer.sample(n, self.generator, batch.x.device) for _ in range(self.draws - 1)]
        self._targets = drawn[0][3]
        self._sizes += [len(d[0]) for d in drawn]
        su = joined_units(batch, self._units, [d[2] for d in drawn])
        x = torch.cat([batch.x, *(d[0] for d in drawn)])
        y = torch.cat([batch.y, *(d[1] for d in drawn)])
        return Batch(x, y, batch.units, su, batch.task)

    def task_loss(self, batch: Batch, logits: Tensor) -> Tensor:
        """The cross-entropy of the current samples only (the first rows); keeps their logits to store."""
        n = self._sizes[0] if self._sizes else len(batch)
        self._logits = logits[:n].detach()
        su = None if batch.sample_units is None else batch.sample_units[:n]
        return cross_entropy(logits[:n], batch.y[:n], batch.units, su)

    def loss(self, batch: Batch, logits: Tensor) -> Tensor | None:
        if len(self._sizes) < 2:
            return None
        n, m = self._sizes[0], self._sizes[1]
        return self.alpha * F.mse_loss(logits[n : n + m], self._targets)

    @torch.no_grad()
    def after_step(self, model: nn.Module, batch: Batch | None = None) -> None:
        if self._pending is None:
            return
        pending, logits = self._pending, self._logits
        if logits is None:
            raise ValueError(f"{self.name} stores the logits of the step's forward: call task_loss before after_step")
        self.buffer.add(self.generator, pending.x, pending.y, pending.task, logits=logits)
        self._pending = self._logits = None
