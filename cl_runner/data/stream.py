"""Task streams: an ordered list of tasks whose tensors already live on the training device.

Output units. Every model has one output layer with ``stream.n_outputs`` units. Targets
(``y_train``/``y_test``) are stored as the *index of the output unit* that should win, and each
task carries the contiguous range of units ``[lo, hi)`` that is active while it is trained:

- task-IL:   task t owns units ``[off_t, off_t + k_t)`` (a multi-head layer: one slice per task;
             slices share no weights, so this is exactly one head per task);
- domain-IL: every task uses the shared units ``[0, k)`` (target = position of the class in its task);
- class-IL:  task t's classes get units ``[off_t, off_t + k_t)``; training task t activates all
             classes seen so far ``[0, off_t + k_t)`` (the seen-class mask, ``active_units=seen``:
             Hsu et al., van de Ven & Tolias), or every unit of the stream from the first task
             (``active_units=all``: one fixed head, as the curvature demonstration's code trains its 30-unit head,
             docs/protocols/curvature.md).

Evaluation of task j after training task i uses :meth:`TaskStream.eval_units`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cl_runner.schema import ACTIVE_UNITS, SCENARIOS  # noqa: E402  (re-exported)


@dataclass
class Task:
    id: int
    name: str
    x_train: Tensor  # float32, model-ready shape, on the device
    y_train: Tensor  # int64 output-unit index, on the device
    x_test: Tensor
    y_test: Tensor
    classes: list[int]  # the dataset's own labels that make up this task
    units: tuple[int, int]  # output units [lo, hi) active while training this task
    own_units: tuple[int, int] = (0, 0)  # units that belong to this task's classes

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])


@dataclass
class TaskStream:
    name: str
    scenario: str
    tasks: list[Task]
    n_outputs: int
    input_shape: tuple[int, ...]
    info: dict = field(default_factory=dict)  # free-form description (dataset, transforms)
    active_units: str = "seen"  # class-IL only: ACTIVE_UNITS

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, t: int) -> Task:
        return self.tasks[t]

    def eval_units(self, trained: int, j: int) -> tuple[int, int]:
        """Active units when testing task ``j`` after training task ``trained`` (-1 = before training).

        Task- and domain-IL use the task's own training units. Class-IL lets every class seen so far
        compete; for a task not trained yet (``j > trained``, the FWT entries) its own classes join,
        so that the entry is defined. With ``active_units=all`` every unit competes, always.
        """
        if self.scenario != "class":
            return self.tasks[j].units
        if self.active_units == "all":
            return (0, self.n_outputs)
        return (0, self.tasks[max(trained, j)].units[1])


def assign_units(
    class_groups: list[list[int]], scenario: str, active_units: str = "seen"
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    """Output-unit layout for tasks with the given classes: (training units, own units, n_outputs)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    check_active_units(active_units, scenario)
    sizes = [len(g) for g in class_groups]
    if scenario == "domain":
        if len(set(sizes)) != 1:
            raise ValueError(f"domain-IL needs the same number of classes in every task (one shared head); got {sizes}")
        k = sizes[0]
        return [(0, k)] * len(sizes), [(0, k)] * len(sizes), k
    own, lo = [], 0
    for k in sizes:
        own.append((lo, lo + k))
        lo += k
    if scenario == "task":
        return own, own, lo
    return [(0, lo if active_units == "all" else hi) for _, hi in own], own, lo


def check_active_units(active_units: str, scenario: str) -> None:
    if active_units not in ACTIVE_UNITS:
        raise ValueError(f"active_units={active_units!r} is unknown; choose one of: {', '.join(ACTIVE_UNITS)}")
    if active_units != "seen" and scenario != "class":
        raise ValueError(
            f"active_units={active_units} applies to scenario=class only (scenario={scenario} has its own heads)"
        )


def label_to_unit(y: Tensor, classes: list[int], own_units: tuple[int, int]) -> Tensor:
    """Map dataset labels of one task to output-unit indices (position in the task + offset)."""
    lut = torch.full((int(max(classes)) + 1,), -1, dtype=torch.long)
    lut[torch.as_tensor(classes, dtype=torch.long)] = torch.arange(len(classes)) + own_units[0]
    return lut[y.long()]


def batch_indices(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[Tensor]:
    """One epoch of mini-batch indices from a seeded permutation (drawn on the CPU, so CPU and GPU
    runs see the same order), moved to the device once per epoch. The last batch may be smaller."""
    perm = torch.randperm(n, generator=generator).to(device, non_blocking=True)
    return iter(perm.split(batch_size))
