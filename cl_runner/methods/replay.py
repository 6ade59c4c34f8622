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

Random draws (reservoir and replay) come from one CPU generator seeded from the run's seed, never
from the global RNG; the memory and the generator's state are part of the checkpoint, so a resumed
run continues the same draws. No strength: ``lambda`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cl_runner.data.stream import Task, TaskStream
from cl_runner.methods.base import Batch, Method
from cl_runner.methods.checks import check_count
from cl_runner.seeding import task_generator

#: ``task_generator``'s task id for the memory's generator (one stream of draws for the whole run)
REPLAY_STREAM = 1 << 20


def reservoir_slots(n_seen: int, draws: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Vectorized algorithm R for one batch: (slots, sources), the memory slots a batch writes and,
    for each, the index in the batch of the sample that ends up there.

    ``draws[i]`` is sample i's uniform draw in [0, 1): the batch's i-th sample is the run's sample
    m = n_seen + i, its slot is m while m < size, else j = ⌊draw · (m + 1)⌋ (j ~ U{0, …, m}), kept
    when j < size. Several samples in one slot: the last one wins (scatter with amax over the
    sample index, deterministic on every device)."""
    b = draws.shape[0]
    m = torch.arange(n_seen, n_seen + b, dtype=torch.long, device=draws.device)
    j = (draws.double() * (m + 1).double()).floor().long()  # double: exact for m < 2^52
    slot = torch.where(m < size, m, j)
    keep = slot < size
    last = torch.full((size,), -1, dtype=torch.long, device=draws.device)
    last.scatter_reduce_(0, slot[keep], torch.arange(b, device=draws.device)[keep], reduce="amax")
    slots = (last >= 0).nonzero().squeeze(1)
    return slots, last[slots]


class Replay(Method):
    name = "replay"
    uses_strength = False

    def __init__(self, strength: float, buffer_size: int, replay_batch: int | None):
        super().__init__(strength)
        self.buffer_size = check_count("buffer_size", buffer_size)
        self.replay_batch = check_count("replay_batch", replay_batch, allow_none=True)
        self._reset()

    def _reset(self) -> None:
        self.n_seen = 0  # training samples seen in the run (algorithm R's m)
        self.memory: dict[str, Tensor] = {}  # x, y, task; allocated at the first update
        self.generator = torch.Generator()
        self._pending: Batch | None = None  # this step's own samples, stored after the step
        self._units: Tensor | None = None  # (T, 2) units of each task's replayed samples, this task

    def setup(self, model: nn.Module, stream: TaskStream, seed: int = 0) -> None:
        super().setup(model, stream, seed)
        self._reset()
        self.generator = task_generator(self.seed, REPLAY_STREAM)

    @property
    def filled(self) -> int:
        return min(self.n_seen, self.buffer_size)

    def state_dict(self) -> dict[str, Any]:
        return {"n_seen": self.n_seen, "memory": dict(self.memory), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n_seen = int(state["n_seen"])
        self.memory = dict(state["memory"])
        self.generator.set_state(state["generator"])

    def before_task(self, model: nn.Module, task: Task) -> None:
        t = task.id
        units = [self.stream.eval_units(t, j) for j in range(t + 1)]
        # one range for every sample (domain-, class-IL) unless some memory task's units differ
        same = len(set(units)) == 1 and units[0] == tuple(task.units)
        self._units = None if same else torch.tensor(units, device=task.y_train.device)

    # ------------------------------------------------------------------ the step
    def replayed(self, n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor] | None:
        """``n`` memory samples (x, y, task) drawn without replacement, or None while it is empty."""
        if self.filled == 0:
            return None
        idx = torch.randperm(self.filled, generator=self.generator)[:n].to(device, non_blocking=True)
        return tuple(self.memory[k][idx] for k in ("x", "y", "task"))

    def training_batch(self, batch: Batch) -> Batch:
        self._pending = batch
        drawn = self.replayed(self.replay_batch or len(batch), batch.x.device)
        if drawn is None:
            return batch
        x, y, task = drawn
        su = batch.sample_units
        if su is not None or self._units is not None:
            own = torch.tensor(batch.units, device=y.device)
            current = su if su is not None else own.expand(len(batch), 2)
            memory = self._units[task] if self._units is not None else own.expand(len(y), 2)
            su = torch.cat([current, memory])
        return Batch(torch.cat([batch.x, x]), torch.cat([batch.y, y]), batch.units, su, batch.task)

    @torch.no_grad()
    def after_step(self, model: nn.Module, batch: Batch | None = None) -> None:
        if self._pending is not None:
            self.store(self._pending)
            self._pending = None

    @torch.no_grad()
    def store(self, batch: Batch) -> None:
        """Algorithm R over the batch's samples (no per-sample Python)."""
        if not self.memory:
            size, dev = self.buffer_size, batch.x.device
            self.memory = {
                "x": torch.zeros((size, *batch.x.shape[1:]), dtype=batch.x.dtype, device=dev),
                "y": torch.zeros(size, dtype=batch.y.dtype, device=dev),
                "task": torch.zeros(size, dtype=torch.long, device=dev),
            }
        draws = torch.rand(len(batch), generator=self.generator, dtype=torch.float64)
        slots, sources = reservoir_slots(self.n_seen, draws, self.buffer_size)
        self.n_seen += len(batch)
        if len(slots) == 0:
            return
        dev = batch.x.device
        slots, sources = slots.to(dev, non_blocking=True), sources.to(dev, non_blocking=True)
        self.memory["x"][slots] = batch.x[sources]
        self.memory["y"][slots] = batch.y[sources]
        self.memory["task"][slots] = batch.task
