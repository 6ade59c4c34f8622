"""Where a run's results go: files in the run directory, TensorBoard, and the terminal."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cl_runner.methods.base import Method
from cl_runner.runfiles import METRICS, read_status, write_atomic
from cl_runner.trainer import TrainerEvents

METRIC_NAMES = ("acc", "bwt", "fwt", "forgetting", "learning_accuracy")


def matrix_markdown(
    matrix: Sequence[Sequence[float]], task_names: Sequence[str], initial: Sequence[float] | None = None
) -> str:
    """The accuracy matrix as a markdown table (percent): rows = after training task i."""
    header = "| after \\ on | " + " | ".join(f"T{j + 1} {n}" for j, n in enumerate(task_names)) + " |"
    lines = [header, "|" + "---|" * (len(task_names) + 1)]
    if initial is not None:
        lines.append("| init | " + " | ".join(f"{100 * a:.2f}" for a in initial) + " |")
    for i, row in enumerate(matrix):
        lines.append(f"| T{i + 1} | " + " | ".join(f"{100 * a:.2f}" for a in row) + " |")
    return "\n".join(lines)


def write_result_files(out_dir: Path, result: dict[str, Any]) -> None:
    """``accuracy_matrix.csv`` (rows: init, after_task_1…; columns: tasks), then ``metrics.json``,
    each written atomically; ``metrics.json`` last, so it never announces files that are not there.
    A finished result (status ok) is never replaced."""
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = read_status(out_dir)
    if previous is not None and previous.get("status") == "ok":
        raise FileExistsError(f"{out_dir / METRICS} already holds a finished run; it is not replaced")
    if result.get("accuracy_matrix") or result.get("initial_accuracy"):
        buffer = io.StringIO()
        w = csv.writer(buffer)
        w.writerow(["after"] + list(result["task_names"]))
        w.writerow(["init"] + [repr(a) for a in result["initial_accuracy"]])
        for i, row in enumerate(result["accuracy_matrix"]):
            w.writerow([f"task_{i + 1}"] + [repr(a) for a in row])
        write_atomic(out_dir / "accuracy_matrix.csv", buffer.getvalue())
    write_atomic(out_dir / METRICS, json.dumps(result, indent=2))


def read_matrix_csv(path: Path) -> tuple[list[float], list[list[float]]]:
    with open(path) as f:
        rows = list(csv.reader(f))[1:]
    return [float(a) for a in rows[0][1:]], [[float(a) for a in r[1:]] for r in rows[1:]]


class TensorBoardLogger(TrainerEvents):
    """A run's TensorBoard events, written into the run folder itself (so that TensorBoard names the
    run after the folder, e.g. ``3_lambda=10,method=ewc``) and its HParams session into the sub-run
    ``<run>/hparams``.

    Conventions (README, "Outputs and TensorBoard"): the step of every event is the number of
    optimizer steps taken since the start of the run (``acc/task_<j>`` at step 0 = the initial
    model, then at the step where each task ended); accuracies and metrics are in percent;
    ``train/loss`` and ``train/penalty`` (λ·penalty) are per optimizer step. The final metrics are
    written once, as ``hparam/<metric>`` in ``<run>/hparams``.
    """

    def __init__(
        self, log_dir: Path, n_tasks: int, log_every: int = 1, trial: str | None = None, purge_step: int | None = None
    ):
        from torch.utils.tensorboard import SummaryWriter

        from cl_runner import tb_extras

        log_dir = Path(log_dir)
        self.log_dir = log_dir
        self.extras = tb_extras
        # purge_step (a resumed run: the optimizer step of its checkpoint) hides the events an earlier,
        # interrupted attempt wrote from that step on, so curves are not drawn twice
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.log_every = max(1, int(log_every))
        self.trial = trial or f"{log_dir.name} ({log_dir.parent.name})"
        self.step = max(0, (purge_step or 1) - 1)  # optimizer steps taken so far
        self.task_end_steps: list[int] = []

    def task_end(self, t: int, first_step: int, losses: list[float], penalties: list[float]) -> None:
        for k in range(0, len(losses), self.log_every):
            self.writer.add_scalar("train/loss", losses[k], first_step + k)
            self.writer.add_scalar("train/penalty", penalties[k], first_step + k)
        self.step = first_step + len(losses)
        self.task_end_steps.append(self.step)

    def evaluated(self, trained: int, row: list[float]) -> None:
        step = 0 if trained < 0 else self.step
        for j, a in enumerate(row):
            self.writer.add_scalar(f"acc/task_{j + 1}", 100.0 * a, step)
        if trained >= 0:
            self.writer.add_scalar("acc/average_seen", 100.0 * sum(row[: trained + 1]) / (trained + 1), step)

    def epoch_evaluated(self, t: int, epoch: int, step: int, accs: list[float], losses: list[float]) -> None:
        for j, (a, loss) in enumerate(zip(accs, losses, strict=True)):
            self.writer.add_scalar(f"epoch/acc_task_{j + 1}", 100.0 * a, step)
            self.writer.add_scalar(f"epoch/loss_task_{j + 1}", loss, step)

    def consolidated(self, t: int, method: Method) -> None:
        importance = method.importance()
        if importance:
            self.extras.write_importance_histograms(self.writer, importance, self.step)
        for tag, image in getattr(method, "curvature_images", dict)().items():  # (H, W) in [0, 1]
            self.writer.add_image(tag, image.detach().float().cpu(), self.step, dataformats="HW")

    def _hparams(self, hparams: dict[str, Any], metrics: dict[str, Any], status: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(self.log_dir / "hparams")) as w:
            self.extras.write_hparams(w, hparams, metrics, status=status, trial=self.trial, step=self.step)

    def final(self, result: dict[str, Any], hparams: dict[str, Any]) -> None:
        names, matrix = result["task_names"], result["accuracy_matrix"]
        self.writer.add_text(
            "accuracy_matrix",
            matrix_markdown(matrix, names, result["initial_accuracy"]) + "\n\n" + self._steps_note(names),
            self.step,
        )
        if matrix:
            self.writer.add_image(
                "accuracy_matrix/heatmap", self.extras.accuracy_heatmap(matrix, names), self.step, dataformats="HWC"
            )
            self.writer.add_image(
                "accuracy_matrix/per_task_curves",
                self.extras.accuracy_curves(matrix, names, result["initial_accuracy"]),
                self.step,
                dataformats="HWC",
            )
        metrics = {k: 100.0 * result[k] for k in METRIC_NAMES if result.get(k) is not None}
        self._hparams(hparams, metrics, result.get("status", "ok"))

    def _steps_note(self, names: Sequence[str]) -> str:
        ends = ", ".join(f"T{i + 1} at step {s}" for i, s in enumerate(self.task_end_steps))
        return (
            f"Accuracies in %. Step axis = optimizer steps since the start of the run: step 0 = the initial "
            f"model; tasks ended at: {ends or 'none'}."
        )

    def failed(self, hparams: dict[str, Any], status: str = "failed") -> None:
        self._hparams(hparams, {}, status)

    def close(self) -> None:
        self.writer.close()


class CurvesCSV(TrainerEvents):
    """``curves.csv`` in the run folder (``eval_every: epoch``): one row per (epoch, evaluated task),
    columns ``task_trained`` (1-based), ``epoch`` (1-based, within that task), ``step`` (optimizer
    steps since the start of the run), ``task`` (evaluated, 1-based), ``accuracy`` (fraction),
    ``loss`` (mean test cross-entropy). Rewritten atomically after every epoch; a resumed run keeps
    the rows of the tasks its checkpoint finished and drops those of the interrupted task."""

    FIELDS = ("task_trained", "epoch", "step", "task", "accuracy", "loss")

    def __init__(self, out_dir: Path, resumed: dict[str, Any] | None = None):
        self.path = Path(out_dir) / "curves.csv"
        self.rows: list[list[Any]] = []
        if resumed and self.path.is_file():
            done = int(resumed["trainer"]["tasks_done"])
            with open(self.path) as f:
                self.rows = [r for r in list(csv.reader(f))[1:] if int(r[0]) <= done]

    def epoch_evaluated(self, t: int, epoch: int, step: int, accs: list[float], losses: list[float]) -> None:
        for j, (a, loss) in enumerate(zip(accs, losses, strict=True)):
            self.rows.append([t + 1, epoch, step, j + 1, repr(a), repr(loss)])
        buffer = io.StringIO()
        w = csv.writer(buffer)
        w.writerow(self.FIELDS)
        w.writerows(self.rows)
        write_atomic(self.path, buffer.getvalue())


class ConsoleLogger(TrainerEvents):
    """A rich progress bar per task; the matrix and metrics as tables at the end."""

    def __init__(self, console: Console | None = None, run_dir: Path | str | None = None):
        self.console = console or Console()
        self.bar: Progress | None = None
        self.run_dir = run_dir

    def task_start(self, t: int, name: str, n_steps: int) -> None:
        self.bar = Progress(
            TextColumn(f"task {t + 1} [bold]{name}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.bar.start()
        self.task_id = self.bar.add_task(name, total=max(n_steps, 1), loss="-")

    def progress(self, t: int, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task_id, completed=step, loss=f"{loss:.4f}")

    def task_end(self, t: int, first_step: int, losses: list[float], penalties: list[float]) -> None:
        if self.bar is not None:
            self.bar.update(self.task_id, completed=max(len(losses), 1))
            self.bar.stop()
            self.bar = None

    def final(self, result: dict[str, Any]) -> None:
        names = result["task_names"]
        table = Table(title="Accuracy matrix (%): row = after training task i, column = test on task j")
        table.add_column("after")
        for j, n in enumerate(names):
            table.add_column(f"T{j + 1} {n}", justify="right")
        table.add_row("init", *[f"{100 * a:.2f}" for a in result["initial_accuracy"]], style="dim")
        for i, row in enumerate(result["accuracy_matrix"]):
            table.add_row(f"T{i + 1}", *[f"{100 * a:.2f}" for a in row])
        self.console.print(table)
        strength = "" if result["lambda"] is None else f" (λ={result['lambda']:g})"
        m = Table(
            title=f"{result['method']}{strength} on {result['benchmark']}, {result['scenario']}-IL, "
            f"seed {result['seed']}"
        )
        for name in METRIC_NAMES:
            m.add_column(name.upper() if name != "learning_accuracy" else "LA", justify="right")
        m.add_column("time", justify="right")
        m.add_row(*[_pct(result[n]) for n in METRIC_NAMES], f"{result['wall_time_s']:.1f}s")
        self.console.print(m)
        self.where(result)

    def where(self, result: dict[str, Any] | None = None) -> None:
        """The last lines of a run: its folder (and how to open it in TensorBoard)."""
        run_dir = self.run_dir or _hydra_output_dir()
        if run_dir is None:
            return
        status = (result or {}).get("status", "ok")
        self.console.print(f"results ({status}): {run_dir}", highlight=False, soft_wrap=True)
        self.console.print(f"  tensorboard --logdir {run_dir}", highlight=False, soft_wrap=True)


def _hydra_output_dir() -> str | None:
    """The run folder of the Hydra job in progress (None outside Hydra, e.g. in tests)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    except Exception:
        return None


def _pct(v: float | None) -> str:
    return (
        "n/a"
        if v is None or (isinstance(v, float) and math.isnan(v))
        else f"{100 * v:+.2f}"
        if v < 0
        else f"{100 * v:.2f}"
    )


class Fanout(TrainerEvents):
    """Forward trainer events to several loggers."""

    def __init__(self, *targets: TrainerEvents):
        self.targets = targets

    def task_start(self, *args) -> None:
        for x in self.targets:
            x.task_start(*args)

    def progress(self, *args) -> None:
        for x in self.targets:
            x.progress(*args)

    def task_end(self, *args) -> None:
        for x in self.targets:
            x.task_end(*args)

    def evaluated(self, *args) -> None:
        for x in self.targets:
            x.evaluated(*args)

    def consolidated(self, *args) -> None:
        for x in self.targets:
            x.consolidated(*args)

    def epoch_evaluated(self, *args) -> None:
        for x in self.targets:
            x.epoch_evaluated(*args)
