"""A run's result files: ``accuracy_matrix.csv`` and ``metrics.json`` (fields: :mod:`cl_runner.schema`)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from cl_runner.runfiles import METRICS, read_status, write_atomic
from cl_runner.trainer import TrainerEvents


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
        w.writerow(["after", *result["task_names"]])
        w.writerow(["init", *map(repr, result["initial_accuracy"])])
        w.writerows([f"task_{i + 1}", *map(repr, row)] for i, row in enumerate(result["accuracy_matrix"]))
        write_atomic(out_dir / "accuracy_matrix.csv", buffer.getvalue())
    write_atomic(out_dir / METRICS, json.dumps(result, indent=2))


def read_matrix_csv(path: Path) -> tuple[list[float], list[list[float]]]:
    with open(path) as f:
        rows = list(csv.reader(f))[1:]
    return [float(a) for a in rows[0][1:]], [[float(a) for a in r[1:]] for r in rows[1:]]


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
