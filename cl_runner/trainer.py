"""Train a model on a task stream, task after task, and fill the accuracy matrix.

The loop draws mini-batches by indexing device-resident tensors with a seeded permutation; per-step
losses stay on the device and are read back once per task (no host sync per step). One step is
:class:`cl_runner.step.TrainingStep`.

:meth:`Trainer.schedule` is the run as a sequence of phases: a generator that does everything around
the training of each task (the method's hooks, evaluation, importance, checkpoints) and *yields* a
:class:`TaskTraining` request for each task's training, receiving the task's (losses, penalties).
:meth:`Trainer.run` answers each request with :meth:`Trainer.train_task` (:func:`drive`); a stacked
sweep group (cl_runner/stacked.py) advances several runs' schedules in one loop and answers their
requests together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_runner import faults, stopping
from cl_runner.data.stream import TaskStream, batch_indices
from cl_runner.methods.base import Method, TrainingData, cross_entropy
from cl_runner.optimizers import make_optimizer_factory
from cl_runner.schema import EVAL_EVERY
from cl_runner.step import TrainingStep

__all__ = ["Trainer", "TaskTraining", "Diverged", "drive", "evaluate", "make_optimizer_factory", "task_loss"]


#: the default task loss (:meth:`Method.task_loss`): cross-entropy over the active units
task_loss = cross_entropy


def evaluate(model: nn.Module, stream: TaskStream, trained: int, batch_size: int = 1024) -> list[float]:
    """Test accuracy on every task after training task ``trained`` (-1: the initial model)."""
    return _evaluate(model, stream, trained, batch_size, with_loss=False)[0]


def evaluate_with_loss(
    model: nn.Module, stream: TaskStream, trained: int, batch_size: int = 1024
) -> tuple[list[float], list[float]]:
    """Test accuracy and mean test cross-entropy (over the units :func:`evaluate` uses) on every task
    after ``trained`` (for the curves over epochs, ``eval_every: epoch``)."""
    return _evaluate(model, stream, trained, batch_size, with_loss=True)


@torch.no_grad()
def _evaluate(
    model: nn.Module, stream: TaskStream, trained: int, batch_size: int, with_loss: bool
) -> tuple[list[float], list[float] | None]:
    """One pass over every task's test set; the loss only when asked (the accuracy matrix needs none)."""
    was_training = model.training
    model.eval()
    accs, losses = [], []
    for j, task in enumerate(stream):
        lo, hi = stream.eval_units(trained, j)
        correct = torch.zeros((), device=task.y_test.device, dtype=torch.long)
        total = torch.zeros((), device=task.y_test.device)
        for xb, yb in zip(task.x_test.split(batch_size), task.y_test.split(batch_size), strict=True):
            logits = model(xb)[:, lo:hi]
            correct += (logits.argmax(1) + lo == yb).sum()
            if with_loss:
                total += F.cross_entropy(logits, yb - lo, reduction="sum")
        n = max(len(task.y_test), 1)
        accs.append(correct.float() / n)
        losses.append(total / n)
    model.train(was_training)
    # one host sync per row
    return torch.stack(accs).tolist(), torch.stack(losses).tolist() if with_loss else None


class TrainerEvents:
    """What the trainer reports; loggers override what they need."""

    def task_start(self, t: int, name: str, n_steps: int) -> None: ...
    def progress(self, t: int, step: int, loss: float) -> None: ...
    def task_end(self, t: int, first_step: int, losses: list[float], penalties: list[float]) -> None: ...
    def evaluated(self, trained: int, row: list[float]) -> None: ...
    def consolidated(self, t: int, method: Method) -> None: ...
    def epoch_evaluated(self, t: int, epoch: int, step: int, accs: list[float], losses: list[float]) -> None:
        """``eval_every: epoch``: test accuracy and loss on every task after epoch ``epoch`` (1-based)
        of task ``t``, ``step`` = optimizer steps since the start of the run."""


class Diverged(RuntimeError):
    """A non-finite training loss, penalty or importance: the run is stopped, not saved as a result."""

    def __init__(self, task: int, step: int | None, what: str):
        self.task, self.step, self.what = task, step, what
        where = f"task {task + 1}" + ("" if step is None else f", step {step}")
        super().__init__(f"diverged: non-finite {what} in {where}")


@dataclass
class TrainResult:
    matrix: list[list[float]]
    initial: list[float]
    steps: int
    task_names: list[str] = field(default_factory=list)


@dataclass
class TaskTraining:
    """A request of :meth:`Trainer.schedule`: train task ``t`` on ``data`` for ``n_steps`` steps
    (answered with the task's per-step (losses, penalties))."""

    trainer: Trainer
    t: int
    data: TrainingData
    n_steps: int


Phases = Generator[TaskTraining, Any, Any]


def drive(phases: Phases) -> Any:
    """Run a schedule to its end, training each requested task with its trainer's own loop; an
    exception of the training is thrown into the schedule (where the run records it). Returns the
    schedule's return value."""
    try:
        request = next(phases)
        while True:
            try:
                answer = request.trainer.train_task(request)
            except BaseException as e:  # noqa: BLE001 - the schedule decides what it means
                request = phases.throw(e)
            else:
                request = phases.send(answer)
    except StopIteration as stop:
        return stop.value


class Trainer:
    """Trains task after task. ``matrix``/``initial``/``steps`` hold the rows finished so far, also
    after an exception (divergence, interruption), so the caller can keep them.

    ``checkpoint`` (optional) is called with :meth:`state_dict` after every finished task;
    :meth:`run` with ``resume=`` such a state continues after its last task and ends with the same
    matrix as an uninterrupted run (every random generator is part of the state).
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        stream: TaskStream,
        optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        *,
        batch_size: int,
        epochs: int = 1,
        iterations: int | None = None,
        reset_optimizer: bool = False,
        eval_batch_size: int = 1024,
        seed: int = 0,
        events: TrainerEvents | None = None,
        progress_every: int = 50,
        checkpoint: Callable[[dict[str, Any]], None] | None = None,
        eval_every: str = "task",
        clip_grad_norm: float | None = None,
    ):
        self.model, self.method, self.stream = model, method, stream
        self.make_optimizer = optimizer
        self.batch_size, self.epochs, self.iterations = batch_size, epochs, iterations
        self.reset_optimizer, self.eval_batch_size = reset_optimizer, eval_batch_size
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.events = events or TrainerEvents()
        self.progress_every = progress_every
        self.checkpoint = checkpoint
        if eval_every not in EVAL_EVERY:
            raise ValueError(f"eval_every={eval_every!r} is unknown; choose one of: {', '.join(EVAL_EVERY)}")
        self.eval_every = eval_every
        self.step = TrainingStep(model, method, clip_grad_norm)
        self.matrix: list[list[float]] = []
        self.initial: list[float] = []
        self.steps = 0
        self.optimizer: torch.optim.Optimizer | None = None

    def steps_for(self, n: int) -> int:
        if n == 0:
            return 0
        if self.iterations:
            return int(self.iterations)
        return int(self.epochs) * math.ceil(n / self.batch_size)

    # ------------------------------------------------------------------ state (checkpoint / resume)
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the rest of the run, at a task boundary."""
        return {
            "tasks_done": len(self.matrix),
            "matrix": [list(r) for r in self.matrix],
            "initial": list(self.initial),
            "steps": self.steps,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "method": self.method.state_dict(),
            "batch_rng": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def _load_state(self, state: Mapping[str, Any]) -> int:
        self.model.load_state_dict(state["model"])
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        # generator states are CPU byte tensors, wherever the checkpoint's tensors were mapped to
        self.generator.set_state(state["batch_rng"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.matrix = [list(r) for r in state["matrix"]]
        self.initial = list(state["initial"])
        self.steps = int(state["steps"])
        return int(state["tasks_done"])

    # ------------------------------------------------------------------ the run's phases
    def run(self, resume: Mapping[str, Any] | None = None) -> TrainResult:
        """The whole stream (continuing after ``resume``'s last task), each task by :meth:`train_task`."""
        return drive(self.schedule(resume))

    def schedule(self, resume: Mapping[str, Any] | None = None) -> Generator[TaskTraining, Any, TrainResult]:
        """The run as phases (see the module docstring): yields one :class:`TaskTraining` per task."""
        model, method, stream, ev = self.model, self.method, self.stream, self.events
        method.setup(model, stream, seed=self.seed)
        self.optimizer = self.make_optimizer(model)
        first = 0
        if resume is not None:
            first = self._load_state(resume)
        else:
            self.initial = evaluate(model, stream, -1, self.eval_batch_size)
            ev.evaluated(-1, self.initial)
        for t in range(first, len(stream)):
            stopping.check()
            task = stream[t]
            if self.reset_optimizer and t > 0:
                self.optimizer = self.make_optimizer(model)
            method.before_task(model, task)
            data = method.training_data(stream, t)
            n_steps = self.steps_for(len(data))
            ev.task_start(t, task.name, n_steps)
            losses, penalties = yield TaskTraining(self, t, data, n_steps)
            ev.task_end(t, self.steps, losses, penalties)
            self.steps += n_steps
            row = self._importance_and_row(t)
            self.matrix.append(row)
            ev.evaluated(t, row)
            if self.checkpoint is not None:
                faults.point("checkpoint", t + 1)
                self.checkpoint(self.state_dict())
        return TrainResult(self.matrix, self.initial, self.steps, [task.name for task in stream])

    def _importance_and_row(self, t: int) -> list[float]:
        """After task t's training: the method's importance, then every task's test accuracy (row t of
        the matrix). The importance after the last task is left out: only later tasks' penalties read
        it (EWC's Fisher on permuted MNIST was 1 s of a 15 s run)."""
        if t < len(self.stream) - 1:
            faults.point("importance", t + 1)
            self.method.after_task(self.model, self.stream[t])
            self._check_after_task(t)
            self.events.consolidated(t, self.method)
        faults.point("evaluate", t + 1)
        return evaluate(self.method.evaluator(self.model, t), self.stream, t, self.eval_batch_size)

    def _check_after_task(self, t: int) -> None:
        """Cheap guards after an importance pass (one host sync per task)."""
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        if {id(p) for p in self.model.parameters()} != held:
            raise RuntimeError(
                f"after task {t + 1}, method {self.method.name} left the model with parameters the optimizer "
                "does not hold (they would no longer be trained); an importance pass must restore them"
            )
        importance = self.method.importance()
        if importance and not bool(torch.stack([torch.isfinite(v).all() for v in importance.values()]).all()):
            raise Diverged(t, None, "importance")

    # ------------------------------------------------------------------ one task's training
    def train_task(self, request: TaskTraining) -> tuple[list[float], list[float]]:
        """The steps of one task: (losses, λ·penalties) per step, read back once at the end."""
        data, n_steps, t = request.data, request.n_steps, request.t
        faults.point("train", t + 1)
        device = next(self.model.parameters()).device
        losses = torch.zeros(n_steps, device=device)
        penalties = torch.zeros(n_steps, device=device)
        self.model.train()
        step, checked, epoch = 0, 0, 0
        while step < n_steps:
            for idx in batch_indices(len(data), self.batch_size, self.generator, device):
                loss, penalty = self.step(data, idx, t, self.optimizer)
                if penalty is not None:
                    penalties[step] = penalty
                losses[step] = loss
                step += 1
                if step % self.progress_every == 0 or step == n_steps:
                    # the host syncs here anyway (progress); check the steps since the last check
                    self.check_finite(losses, penalties, checked, step, t)
                    stopping.check()
                    checked = step
                    self.events.progress(t, step, float(losses[step - 1]))
                if step >= n_steps:
                    break
            epoch += 1  # a pass over the task's data ended (or the task's last step, with `iterations`)
            if self.eval_every == "epoch":
                scorer = self.method.evaluator(self.model, t)
                accs, test_losses = evaluate_with_loss(scorer, self.stream, t, self.eval_batch_size)
                self.events.epoch_evaluated(t, epoch, self.steps + step, accs, test_losses)
        return losses.tolist(), penalties.tolist()

    @staticmethod
    def check_finite(losses: Tensor, penalties: Tensor, lo: int, hi: int, t: int) -> None:
        """:class:`Diverged` at the earliest step in [lo, hi) whose loss or penalty is not finite."""
        finite = torch.isfinite(torch.stack([losses[lo:hi], penalties[lo:hi]]))
        if bool(finite.all()):
            return
        first = int((~finite.all(0)).nonzero()[0])  # the earliest step with a non-finite value
        raise Diverged(t, lo + first + 1, "training loss" if not finite[0, first] else "penalty")
