"""Files a run writes while it trains, besides its record (:mod:`cl_runner.record`): ``curves.csv``."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from cl_runner.runfiles import write_atomic
from cl_runner.trainer import TrainerEvents


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
