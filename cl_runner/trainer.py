"""Train a model on a task stream, task after task, and fill the accuracy matrix.

The loop draws mini-batches by indexing device-resident tensors with a seeded permutation; per-step
losses stay on the device and are read back once per task (no host sync per step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_runner.build import options, partial, unknown_options
from cl_runner.data.stream import TaskStream, batch_indices
from cl_runner.methods.base import Batch, Method, TrainingData, cross_entropy


def make_optimizer_factory(cfg: Mapping[str, Any]) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """model → optimizer over its parameters: the ``optimizer`` node's ``_target_`` with its options
    (lr and weight decay checked first, so that a bad value is one line)."""
    make = partial(cfg, "optimizer")
    bad = unknown_options(make.func, options(cfg), skip=("params",))
    if bad:
        raise ValueError(
            f"optimizer {cfg.get('name')} has no option {', '.join(bad)}; valid options: {', '.join(bad.valid)}"
        )
    try:
        lr, wd = float(cfg["lr"]), float(cfg.get("weight_decay", 0.0) or 0.0)
    except (TypeError, ValueError):
        raise ValueError(f"optimizer.lr and optimizer.weight_decay must be numbers, got {cfg['lr']!r}") from None
    if not lr > 0 or not math.isfinite(lr):  # also refuses nan
        raise ValueError(f"optimizer.lr must be > 0 and finite, got {lr}")
    if not wd >= 0 or not math.isfinite(wd):
        raise ValueError(f"optimizer.weight_decay must be >= 0 and finite, got {wd}")
    return lambda m: make(m.parameters(), lr=lr, weight_decay=wd)


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


EVAL_EVERY = ("task", "epoch")


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
        self.clip_grad_norm = clip_grad_norm
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
        self.generator.set_state(state["batch_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.matrix = [list(r) for r in state["matrix"]]
        self.initial = list(state["initial"])
        self.steps = int(state["steps"])
        return int(state["tasks_done"])

    # ------------------------------------------------------------------ the loop
    def run(self, resume: Mapping[str, Any] | None = None) -> TrainResult:
        model, method, stream, ev = self.model, self.method, self.stream, self.events
        device = next(model.parameters()).device
        method.setup(model, stream, seed=self.seed)
        self.optimizer = self.make_optimizer(model)
        first = 0
        if resume is not None:
            first = self._load_state(resume)
        else:
            self.initial = evaluate(model, stream, -1, self.eval_batch_size)
            ev.evaluated(-1, self.initial)
        for t in range(first, len(stream)):
            task = stream[t]
            if self.reset_optimizer and t > 0:
                self.optimizer = self.make_optimizer(model)
            method.before_task(model, task)
            data = method.training_data(stream, t)
            n_steps = self.steps_for(len(data))
            ev.task_start(t, task.name, n_steps)
            losses, penalties = self._train_task(data, self.optimizer, n_steps, device, t)
            ev.task_end(t, self.steps, losses, penalties)
            self.steps += n_steps
            row = self._importance_and_row(t)
            self.matrix.append(row)
            ev.evaluated(t, row)
            if self.checkpoint is not None:
                self.checkpoint(self.state_dict())
        return TrainResult(self.matrix, self.initial, self.steps, [task.name for task in stream])

    def _importance_and_row(self, t: int) -> list[float]:
        """After task t's training: the method's importance, then every task's test accuracy (row t of
        the matrix). The importance after the last task is left out: only later tasks' penalties read
        it (EWC's Fisher on permuted MNIST was 1 s of a 15 s run)."""
        if t < len(self.stream) - 1:
            self.method.after_task(self.model, self.stream[t])
            self._check_after_task(t)
            self.events.consolidated(t, self.method)
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

    def _train_task(
        self, data: TrainingData, optimizer: torch.optim.Optimizer, n_steps: int, device: torch.device, t: int
    ) -> tuple[list[float], list[float]]:
        model, method = self.model, self.method
        losses = torch.zeros(n_steps, device=device)
        penalties = torch.zeros(n_steps, device=device)
        model.train()
        step, checked, epoch = 0, 0, 0
        while step < n_steps:
            for idx in batch_indices(len(data), self.batch_size, self.generator, device):
                batch, loss = self._forward_backward(data, idx, t, optimizer)
                penalty = self._gradient_hooks(batch)
                if penalty is not None:
                    penalties[step] = penalty
                optimizer.step()
                method.after_step(model, batch)
                losses[step] = loss.detach()
                step += 1
                if step % self.progress_every == 0 or step == n_steps:
                    # the host syncs here anyway (progress); check the steps since the last check
                    self._check_finite(losses, penalties, checked, step, t)
                    checked = step
                    self.events.progress(t, step, float(losses[step - 1]))
                if step >= n_steps:
                    break
            epoch += 1  # a pass over the task's data ended (or the task's last step, with `iterations`)
            if self.eval_every == "epoch":
                scorer = self.method.evaluator(model, t)
                accs, test_losses = evaluate_with_loss(scorer, self.stream, t, self.eval_batch_size)
                self.events.epoch_evaluated(t, epoch, self.steps + step, accs, test_losses)
        return losses.tolist(), penalties.tolist()

    def _forward_backward(
        self, data: TrainingData, idx: Tensor, t: int, optimizer: torch.optim.Optimizer
    ) -> tuple[Batch, Tensor]:
        """A step up to ``.backward()``: the method's batch, the task loss (+ the method's term)."""
        method = self.method
        su = None if data.sample_units is None else data.sample_units[idx]
        batch = method.training_batch(Batch(data.x[idx], data.y[idx], data.units, su, t))
        optimizer.zero_grad(set_to_none=True)
        logits = self.model(batch.x)
        loss = method.task_loss(batch, logits)
        extra = method.loss(batch, logits)
        if extra is not None:
            loss = loss + extra
        loss.backward()
        return batch, loss

    def _gradient_hooks(self, batch: Batch) -> Tensor | None:
        """After ``.backward()``, before the optimizer step: the method's gradient hook, then λ·penalty's
        gradient, then ``clip_grad_norm`` on the whole gradient (task loss + penalty, as the seeds' code
        clips after the regularized loss's backward); returns λ·penalty (None without one)."""
        self.method.after_backward(self.model, batch)
        penalty = self.method.add_penalty_grad(self.model) if self.method.strength else None
        if self.clip_grad_norm is not None:
            # foreach=True: one fused kernel; no host sync (the norm stays on the device)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm, foreach=True)
        return penalty

    def _check_finite(self, losses: Tensor, penalties: Tensor, lo: int, hi: int, t: int) -> None:
        finite = torch.isfinite(torch.stack([losses[lo:hi], penalties[lo:hi]]))
        if bool(finite.all()):
            return
        first = int((~finite.all(0)).nonzero()[0])  # the earliest step with a non-finite value
        raise Diverged(t, lo + first + 1, "training loss" if not finite[0, first] else "penalty")
