"""ER-ACE, experience replay with the asymmetric cross-entropy (Caccia et al. 2022, "New Insights on
Reducing Abrupt Representation Change in Online Continual Learning", ICLR):

    L = CE_{C_in}(f(x), y)  +  CE(f(x'), y'),     (x', y') ~ reservoir memory

each term a mean over its own samples. The incoming batch's cross-entropy runs over the units C_in
only; the memory samples' over all units seen (so new classes do not push the old ones' logits down
through the incoming samples, and old classes still compete on replayed ones).

Which units C_in are, as the authors' code computes it (pclucas14/AML ``methods/er_ace.py``; the
newest mammoth ``models/er_ace.py`` is the same): the classes *present in the incoming batch*, plus
every unit from the highest class seen so far in incoming batches upward (``mask[:, seen.max():] = 1``:
classes not seen yet stay in, and the highest seen class with them). Not "the current task's
classes": a class of the current task absent from the batch and below the highest seen one is left
out. Here C_in is that set within the batch's active units (``active_units=all``: every unit, as
the codes' heads; class-IL with the seen-class mask: the units beyond the seen ones are inactive
anyway; task-IL: the task's head). Memory samples train on the units that test their task at this
point (``stream.eval_units``: every unit with ``active_units=all``, as the codes' plain
``F.cross_entropy``; every class seen with the seen-class mask).

When: ``task_free: true`` (the authors' code, which forces it for ER-ACE; mammoth's own best
config for seq-cifar10 sets it) applies the mask and replays from the first step on, once the memory
holds a sample; ``task_free: false`` (mammoth's default) trains the first task with the plain
cross-entropy and replays from the second task on. The memory is the reservoir of every incoming
batch, written after the step (``after_step``), ``replay_batch`` samples drawn without replacement
per step (mammoth's ``--minibatch_size``, the authors' ``--buffer_batch_size``; null: as many as
the batch).

Not followed (a model change, not a method option): both codes replace the classifier by a cosine
layer (logits = 10 · cos(feature, w_c), ``distLinear`` / ``CustomLinear``, mammoth's
``--use_custom_classifier`` default); here the run's model keeps its linear head. One forward over
[batch, memory] instead of two (the same for models without batch statistics). The authors' buffer
fills slots with a per-batch approximation of algorithm R; cl-runner's reservoir is exact
(:mod:`cl_runner.methods.memory`). No strength: ``lambda`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_runner.data.stream import Task, TaskStream
from cl_runner.methods.base import Batch, Method, cross_entropy
from cl_runner.methods.checks import check_bool, check_count
from cl_runner.methods.memory import ReservoirMemory, joined_units, replay_units
from cl_runner.seeding import task_generator

#: ``task_generator``'s task id for ER-ACE's generator
ER_ACE_STREAM = (1 << 20) + 32


def incoming_units(y: Tensor, seen: Tensor) -> Tensor:
    """ER-ACE's mask over the units for the incoming batch (labels ``y``) after ``seen`` (bool per
    unit) was updated with it: the units present in the batch and every unit from the highest seen
    one upward. On the device, no host sync."""
    unit = torch.arange(len(seen), device=seen.device)
    present = torch.zeros_like(seen)
    present[y] = True
    highest = torch.where(seen, unit, -1).max()
    return present | (unit >= highest)


class ERACE(Method):
    name = "er_ace"
    uses_strength = False

    def __init__(self, strength: float, buffer_size: int, replay_batch: int | None, task_free: bool):
        super().__init__(strength)
        self.buffer_size = check_count("buffer_size", buffer_size)
        self.replay_batch = check_count("replay_batch", replay_batch, allow_none=True)
        self.task_free = check_bool("task_free", task_free)
        self._reset()

    def _reset(self) -> None:
        self.buffer = ReservoirMemory(self.buffer_size)
        self.generator = torch.Generator()
        self.seen: Tensor | None = None  # bool per output unit: labels of incoming batches so far
        self._pending: Batch | None = None
        self._n = 0  # the step's incoming samples (the first rows of its batch)
        self._units: Tensor | None = None

    def setup(self, model: nn.Module, stream: TaskStream, seed: int = 0) -> None:
        super().setup(model, stream, seed)
        self._reset()
        self.generator = task_generator(self.seed, ER_ACE_STREAM)

    def state_dict(self) -> dict[str, Any]:
        return {**self.buffer.state_dict(), "generator": self.generator.get_state(), "seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer.load_state_dict(state)
        self.generator.set_state(state["generator"].cpu())  # a CPU generator, whatever the map_location
        self.seen = state["seen"]

    def before_task(self, model: nn.Module, task: Task) -> None:
        self._units = replay_units(self.stream, task)

    def _asymmetric(self, batch: Batch) -> bool:
        return self.task_free or batch.task > 0

    # ------------------------------------------------------------------ the step
    def training_batch(self, batch: Batch) -> Batch:
        self._pending, self._n = batch, len(batch)
        if self.seen is None:
            self.seen = torch.zeros(self.stream.n_outputs, dtype=torch.bool, device=batch.y.device)
        self.seen[batch.y] = True
        if not self._asymmetric(batch):
            return batch
        drawn = self.buffer.sample(self.replay_batch or len(batch), self.generator, batch.x.device)
        if drawn is None:
            return batch
        x, y, task = drawn
        su = joined_units(batch, self._units, [task])
        return Batch(torch.cat([batch.x, x]), torch.cat([batch.y, y]), batch.units, su, batch.task)

    def task_loss(self, batch: Batch, logits: Tensor) -> Tensor:
        """The incoming samples' cross-entropy, over ER-ACE's units (the mask) within their active ones."""
        n = self._n or len(batch)
        su = None if batch.sample_units is None else batch.sample_units[:n]
        if not self._asymmetric(batch):
            return cross_entropy(logits[:n], batch.y[:n], batch.units, su)
        unit = torch.arange(logits.shape[1], device=logits.device)
        if su is None:
            lo, hi = batch.units
            active = ((unit >= lo) & (unit < hi)).unsqueeze(0)
        else:
            active = (unit >= su[:, :1]) & (unit < su[:, 1:])
        active = active & incoming_units(batch.y[:n], self.seen)
        return F.cross_entropy(logits[:n].masked_fill(~active, float("-inf")), batch.y[:n])

    def loss(self, batch: Batch, logits: Tensor) -> Tensor | None:
        n = self._n or len(batch)
        if len(batch) == n:
            return None
        su = None if batch.sample_units is None else batch.sample_units[n:]
        return cross_entropy(logits[n:], batch.y[n:], batch.units, su)

    @torch.no_grad()
    def after_step(self, model: nn.Module, batch: Batch | None = None) -> None:
        if self._pending is not None:
            self.buffer.add(self.generator, self._pending.x, self._pending.y, self._pending.task)
            self._pending, self._n = None, 0
