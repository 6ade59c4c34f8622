"""Where a run's results go: files in the run directory, TensorBoard, and the terminal."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cl_runner.methods.base import Method
from cl_runner.runfiles import METRICS, read_status, write_atomic
from cl_runner.trainer import TrainerEvents

METRIC_NAMES = ("acc", "bwt", "fwt", "forgetting", "learning_accuracy")


def matrix_markdown(matrix: Sequence[Sequence[float]], task_names: Sequence[str], initial: Sequence[float] | None = None) -> str:
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
    """Scalars per step and per task, the final matrix (table + heatmap), hparams and importances."""

    def __init__(self, log_dir: Path, n_tasks: int, log_every: int = 1):
        from torch.utils.tensorboard import SummaryWriter

        from cl_runner import tb_extras

        self.extras = tb_extras
        self.writer = SummaryWriter(str(log_dir))
        self.log_every = max(1, int(log_every))
        self.writer.add_custom_scalars(tb_extras.custom_scalars_layout(n_tasks))

    def task_end(self, t: int, first_step: int, losses: list[float], penalties: list[float]) -> None:
        for k in range(0, len(losses), self.log_every):
            self.writer.add_scalar("train/loss", losses[k], first_step + k)
            self.writer.add_scalar("train/penalty", penalties[k], first_step + k)

    def evaluated(self, trained: int, row: list[float]) -> None:
        if trained < 0:
            for j, a in enumerate(row):
                self.writer.add_scalar(f"acc_init/task_{j + 1}", a, 0)
            return
        for j, a in enumerate(row):
            self.writer.add_scalar(f"acc/task_{j + 1}", a, trained + 1)
        self.writer.add_scalar("acc/average_seen", sum(row[: trained + 1]) / (trained + 1), trained + 1)

    def consolidated(self, t: int, method: Method) -> None:
        importance = method.importance()
        if importance:
            self.extras.write_importance_histograms(self.writer, importance, t + 1)

    def final(self, result: dict[str, Any], hparams: dict[str, Any]) -> None:
        T = len(result["task_names"])
        for name in METRIC_NAMES:
            if result[name] is not None:
                self.writer.add_scalar(f"metrics/{name}", result[name], T)
        self.writer.add_text(
            "accuracy_matrix",
            matrix_markdown(result["accuracy_matrix"], result["task_names"], result["initial_accuracy"]),
            T,
        )
        image = self.extras.accuracy_heatmap(result["accuracy_matrix"], result["task_names"])
        self.writer.add_image("accuracy_matrix/heatmap", image, T, dataformats="HWC")
        metrics = {k: result[k] for k in METRIC_NAMES if result[k] is not None}
        self.extras.write_hparams(self.writer, hparams, metrics)

    def failed(self, hparams: dict[str, Any]) -> None:
        self.extras.write_hparams(self.writer, hparams, {}, status="failed")

    def close(self) -> None:
        self.writer.close()


class ConsoleLogger(TrainerEvents):
    """A rich progress bar per task; the matrix and metrics as tables at the end."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.bar: Progress | None = None

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
        m = Table(title=f"{result['method']}{strength} on {result['benchmark']}, {result['scenario']}-IL, seed {result['seed']}")
        for name in METRIC_NAMES:
            m.add_column(name.upper() if name != "learning_accuracy" else "LA", justify="right")
        m.add_column("time", justify="right")
        m.add_row(*[_pct(result[n]) for n in METRIC_NAMES], f"{result['wall_time_s']:.1f}s")
        self.console.print(m)


def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:+.2f}" if v < 0 else f"{100 * v:.2f}"


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
