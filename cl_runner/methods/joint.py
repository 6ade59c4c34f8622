"""Joint training, the upper bound: no regularization, the model sees the union of tasks.

- ``mode: cumulative`` (van de Ven & Tolias' "offline" bound): while at task t, train on the union
  of the training sets of tasks 0..t (so every row of the accuracy matrix is an upper bound).
- ``mode: all`` (Hsu et al.'s "one model trained on the union of all five tasks"): train nothing
  before the last task; at the last task, train once on the union of all tasks.

Output units: in task-IL every sample keeps its own task's units (``sample_units``, one (lo, hi)
row per sample); in domain-IL the shared head; in class-IL ``[0, hi_t)``, which covers every class
seen up to task t. The union is shuffled by the trainer's batch order, not here. No strength:
``lambda`` is refused.
"""

from __future__ import annotations

import torch

from cl_runner.data.stream import TaskStream
from cl_runner.methods.base import Method, TrainingData
from cl_runner.methods.checks import check_choice

MODES = ("cumulative", "all")


class Joint(Method):
    name = "joint"
    stackable = True  # the vectorized launcher may train it stacked (cl_runner/stacked.py)
    uses_strength = False

    def __init__(self, strength: float, mode: str):
        super().__init__(strength)
        self.mode = check_choice("mode", mode, MODES)

    def undefined_metrics(self) -> dict[str, str]:
        if self.mode != "all":
            return {}
        reason = "method=joint mode=all trains only at the last task: earlier rows are the untrained model"
        return {k: reason for k in ("bwt", "fwt", "forgetting", "learning_accuracy")}

    def training_data(self, stream: TaskStream, t: int) -> TrainingData:
        task = stream[t]
        if self.mode == "all" and t < len(stream) - 1:
            return TrainingData(task.x_train[:0], task.y_train[:0], task.units)
        tasks = stream.tasks[: t + 1]
        x = torch.cat([k.x_train for k in tasks])
        y = torch.cat([k.y_train for k in tasks])
        sample_units = None
        if stream.scenario == "task":
            sample_units = torch.cat([torch.tensor(k.units, device=y.device).expand(k.n_train, 2) for k in tasks])
        return TrainingData(x, y, task.units, sample_units)
