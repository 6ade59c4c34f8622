"""Replay: a reservoir memory of past training samples, trained on together with each batch.

Memory (Vitter 1985, algorithm R): ``buffer_size`` slots held on the device as tensors (x, y, task
id). The m-th training sample seen in the run (m = 0, 1, …) goes to slot m while m < size; after
that a draw j ~ U{0, …, m} puts it in slot j when j < size, else it is dropped, so every sample seen
so far is in memory with probability size / (m + 1). The buffer is updated with every training batch
after the optimizer step (``after_step``), vectorized: one draw per sample of the batch, and when
several samples of a batch land in the same slot the latest wins, exactly as the sequential
algorithm (``reservoir_slots``; tests/test_replay.py checks it against a plain Python loop on the
same draws).

Each step (``training_batch``): ``replay_batch`` memory samples (null = as many as the current
batch; fewer while the memory holds fewer) drawn without replacement are appended to the batch,
so the task loss is the mean cross-entropy over the concatenation (Chaudhry et al. 2019's
experience replay; PROTOCOLS.md D3). Nothing is replayed before the memory holds a sample, and
while training task t the memory also holds task t's own earlier batches (D3: "updated with every
training batch").

Output units: a memory sample of task j trained while training task t is given the units that test
task j at that point, ``stream.eval_units(t, j)``: in class-IL all classes seen so far (its class
unit keeps competing with the new ones); in task-IL task j's own head; in domain-IL the shared head.
When those differ from the batch's units (task-IL) the batch carries one range per sample.

This is the DER paper's ER (Buzzega et al. 2020, Table 2; mammoth c66408f ``models/er.py``): with
``replay_batch`` = mammoth's ``--minibatch_size`` a step computes what mammoth's ``observe`` does —
the mean cross-entropy over cat(batch, min(minibatch_size, memory filled) memory samples drawn
without replacement), over the whole head in the table's settings (S-MNIST with
``active_units=all``, P-/R-MNIST's shared head), then the batch alone offered to the reservoir
after the optimizer step (tests/test_baselines_b.py checks one step against that code). mammoth
draws from numpy's global RNG, sample by sample; the distributions are the same.

The memory is the shared :class:`~cl_runner.methods.memory.ReservoirMemory` (``self.buffer``;
``memory``, ``n_seen`` and ``filled`` read it). Random draws (reservoir and replay) come from one
CPU generator seeded from the run's seed, never from the global RNG; the memory and the
generator's state are part of the checkpoint, so a resumed run continues the same draws. No
strength: ``lambda`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cl_runner.data.stream import Task, TaskStream
from cl_runner.methods.base import Batch, Method
from cl_runner.methods.checks import check_count
from cl_runner.methods.memory import ReservoirMemory, joined_units, replay_units, reservoir_slots
from cl_runner.seeding import task_generator

__all__ = ["REPLAY_STREAM", "Replay", "reservoir_slots"]

#: ``task_generator``'s task id for the memory's generator (one stream of draws for the whole run)
REPLAY_STREAM = 1 << 20


class Replay(Method):
    name = "replay"
    uses_strength = False

    def __init__(self, strength: float, buffer_size: int, replay_batch: int | None):
        super().__init__(strength)
        self.buffer_size = check_count("buffer_size", buffer_size)
        self.replay_batch = check_count("replay_batch", replay_batch, allow_none=True)
        self._reset()

    def _reset(self) -> None:
        self.buffer = ReservoirMemory(self.buffer_size)  # x, y, task; allocated at the first update
        self.generator = torch.Generator()
        self._pending: Batch | None = None  # this step's own samples, stored after the step
        self._units: Tensor | None = None  # (T, 2) units of each task's replayed samples, this task

    def setup(self, model: nn.Module, stream: TaskStream, seed: int = 0) -> None:
        super().setup(model, stream, seed)
        self._reset()
        self.generator = task_generator(self.seed, REPLAY_STREAM)

    @property
    def n_seen(self) -> int:
        """Training samples seen in the run (algorithm R's m)."""
        return self.buffer.n_seen

    @property
    def memory(self) -> dict[str, Tensor]:
        """The memory's tensors: x, y, task (empty before the first update)."""
        return self.buffer.tensors

    @property
    def filled(self) -> int:
        return self.buffer.filled

    def state_dict(self) -> dict[str, Any]:
        return {**self.buffer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer.load_state_dict(state)
        self.generator.set_state(state["generator"].cpu())  # a CPU generator, whatever the map_location

    def before_task(self, model: nn.Module, task: Task) -> None:
        # one range for every sample (domain-, class-IL) unless some memory task's units differ
        self._units = replay_units(self.stream, task)

    # ------------------------------------------------------------------ the step
    def replayed(self, n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor] | None:
        """``n`` memory samples (x, y, task) drawn without replacement, or None while it is empty."""
        return self.buffer.sample(n, self.generator, device)

    def training_batch(self, batch: Batch) -> Batch:
        self._pending = batch
        drawn = self.replayed(self.replay_batch or len(batch), batch.x.device)
        if drawn is None:
            return batch
        x, y, task = drawn
        su = joined_units(batch, self._units, [task])
        return Batch(torch.cat([batch.x, x]), torch.cat([batch.y, y]), batch.units, su, batch.task)

    @torch.no_grad()
    def after_step(self, model: nn.Module, batch: Batch | None = None) -> None:
        if self._pending is not None:
            self.store(self._pending)
            self._pending = None

    @torch.no_grad()
    def store(self, batch: Batch) -> None:
        """Algorithm R over the batch's samples (no per-sample Python)."""
        self.buffer.add(self.generator, batch.x, batch.y, batch.task)
