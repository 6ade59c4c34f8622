"""A run's record — ``metrics.json`` and ``accuracy_matrix.csv`` — for every outcome.

One function builds the record (:func:`build`: ok, diverged, interrupted, failed, cancelled,
timeout), one writes it (:func:`write`), one reads it back (:func:`read`); the run, the command
line's failure path and the Slurm launcher all go through them, so every ``metrics.json`` has the same
fields: ``status``, ``error``, the identity fields (:data:`cl_runner.schema.IDENTITY`) and
``method_options``, the metrics (:data:`cl_runner.schema.METRICS`, null unless ``ok``),
``metric_notes``, ``accuracy_matrix`` / ``initial_accuracy`` / ``task_names`` / ``tasks_done`` (the
rows finished so far, also for a run that did not end ok), ``steps``, ``wall_time_s``, ``device``.

Statuses (:data:`cl_runner.schema.STATUSES`): :data:`~cl_runner.schema.FINAL` ones (ok, diverged) are
never replaced and never run again; every other one (interrupted, failed, cancelled, timeout) is a
run the same command resumes from its checkpoint. No torch import (the sweep summary reads records).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_runner.runfiles import METRICS as METRICS_FILE
from cl_runner.runfiles import write_atomic
from cl_runner.schema import FINAL, METRICS, STATUSES

MATRIX_FILE = "accuracy_matrix.csv"


@dataclass
class Progress:
    """What a run finished: the initial accuracies and one matrix row per finished task."""

    initial: list[float] = field(default_factory=list)
    matrix: list[list[float]] = field(default_factory=list)
    task_names: list[str] = field(default_factory=list)
    steps: int | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Progress:
        return cls(
            list(record.get("initial_accuracy") or []),
            [list(r) for r in record.get("accuracy_matrix") or []],
            list(record.get("task_names") or []),
            record.get("steps"),
        )


def build(
    status: str,
    identity: Mapping[str, Any],
    *,
    error: str | None = None,
    progress: Progress | None = None,
    metrics: Mapping[str, Any] | None = None,
    notes: Mapping[str, str] | None = None,
    wall_time_s: float | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The record of a run that ended with ``status``. ``metrics`` (only for ``ok``) hold the values of
    :data:`~cl_runner.schema.METRICS`; ``notes``: metrics that mean nothing for this run (reported
    as null, with the reason)."""
    if status not in STATUSES or status == "missing":
        raise ValueError(f"a record cannot have status {status!r}")
    progress = progress or Progress()
    values = dict.fromkeys(METRICS)
    if status == "ok" and metrics is not None:
        values.update({k: metrics[k] for k in METRICS})
    values.update(dict.fromkeys(notes or {}))
    names = list(progress.task_names)
    if not names and progress.initial:
        names = [f"task_{j + 1}" for j in range(len(progress.initial))]
    return {
        "status": status,
        "error": error,
        **identity,
        **values,
        "metric_notes": dict(notes) if notes else None,
        "accuracy_matrix": [list(r) for r in progress.matrix],
        "initial_accuracy": list(progress.initial),
        "task_names": names,
        "tasks_done": len(progress.matrix),
        "steps": progress.steps,
        "wall_time_s": wall_time_s,
        "device": device,
    }


def relabel(previous: Mapping[str, Any], status: str, error: str) -> dict[str, Any]:
    """``previous`` (a resumable record) under another status and error, its rows kept."""
    return {**previous, "status": status, "error": error}


def read(folder: str | Path) -> dict[str, Any] | None:
    """The run's ``metrics.json`` (a dict), or None when there is none or it cannot be read."""
    try:
        data = json.loads((Path(folder) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_final(record: Mapping[str, Any] | None) -> bool:
    """True for a record that is never replaced nor run again (:data:`~cl_runner.schema.FINAL`)."""
    return record is not None and record.get("status") in FINAL


class Finished(FileExistsError):
    """The folder already holds a final record; it is never replaced."""


def write(out_dir: str | Path, record: Mapping[str, Any]) -> None:
    """``accuracy_matrix.csv`` (rows: init, after_task_1…; columns: tasks) when there are rows, then
    ``metrics.json``, each written atomically; ``metrics.json`` last, so it never announces files that
    are not there. A final record already in the folder is never replaced (:class:`Finished`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_final(read(out_dir)):
        raise Finished(f"{out_dir / METRICS_FILE} already holds a finished run; it is not replaced")
    if record.get("accuracy_matrix") or record.get("initial_accuracy"):
        write_atomic(
            out_dir / MATRIX_FILE,
            matrix_csv(record["task_names"], record["initial_accuracy"], record["accuracy_matrix"]),
        )
    write_atomic(out_dir / METRICS_FILE, json.dumps(dict(record), indent=2))


def matrix_csv(task_names: Sequence[str], initial: Sequence[float], matrix: Sequence[Sequence[float]]) -> str:
    buffer = io.StringIO()
    w = csv.writer(buffer)
    w.writerow(["after", *task_names])
    w.writerow(["init", *map(repr, initial)])
    w.writerows([f"task_{i + 1}", *map(repr, row)] for i, row in enumerate(matrix))
    return buffer.getvalue()


def read_matrix_csv(path: str | Path) -> tuple[list[float], list[list[float]]]:
    """(initial accuracies, matrix rows) of an ``accuracy_matrix.csv``."""
    with open(path) as f:
        rows = list(csv.reader(f))[1:]
    return [float(a) for a in rows[0][1:]], [[float(a) for a in r[1:]] for r in rows[1:]]
