"""The terminal: a rich progress bar per task, the matrix and metrics as tables at the end; and
:class:`Fanout`, which forwards the trainer's events to several loggers.

Names (tasks, method, benchmark) and paths are printed as they are: never read as rich markup (a
``[/red]`` in a name raised) or as terminal control sequences. The console made here has markup off,
so that whatever else is printed through it is literal too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cl_runner.schema import METRICS, TITLES, pct, printable
from cl_runner.trainer import TrainerEvents


class Fanout(TrainerEvents):
    """Forward every :class:`TrainerEvents` event (also ones added there later) to each target."""

    def __init__(self, *targets: TrainerEvents):
        self.targets = targets


def _forward(name: str):
    def event(self: Fanout, *args: Any, **kwargs: Any) -> None:
        for target in self.targets:
            getattr(target, name)(*args, **kwargs)

    return event


for _name in [n for n in vars(TrainerEvents) if not n.startswith("_")]:
    setattr(Fanout, _name, _forward(_name))


class ConsoleLogger(TrainerEvents):
    def __init__(self, console: Console | None = None, run_dir: Path | str | None = None):
        self.console = console or Console(markup=False)
        self.bar: Progress | None = None
        self.run_dir = run_dir

    def task_start(self, t: int, name: str, n_steps: int) -> None:
        # TextColumn formats its text (str.format) and then reads it as markup: both escaped
        label = escape(printable(name)).replace("{", "{{").replace("}", "}}")
        self.bar = Progress(
            TextColumn(f"task {t + 1} [bold]{label}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=self.console,
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
        table = Table(title="Accuracy matrix (%): row = after training task i, column = test on task j")
        table.add_column("after")
        for j, n in enumerate(result["task_names"]):
            table.add_column(Text(printable(f"T{j + 1} {n}")), justify="right")
        table.add_row("init", *map(pct, result["initial_accuracy"]), style="dim")
        for i, row in enumerate(result["accuracy_matrix"]):
            table.add_row(f"T{i + 1}", *map(pct, row))
        self.console.print(table)
        strength = "" if result["lambda"] is None else f" (λ={result['lambda']:g})"
        where = f"{result['benchmark']}, {result['scenario']}-IL, seed {result['seed']}"
        title = Text(printable(f"{result['method']}{strength} on {where}"))
        m = Table(*(TITLES[n] for n in METRICS), "time", title=title)
        for column in m.columns:
            column.justify = "right"
        m.add_row(*[pct(result[n], blank="n/a") for n in METRICS], f"{result['wall_time_s']:.1f}s")
        self.console.print(m)
        self.where(result)

    def where(self, result: dict[str, Any] | None = None) -> None:
        """The last lines of a run: its folder (and how to open it in TensorBoard)."""
        if self.run_dir is None:
            return
        status = (result or {}).get("status", "ok")
        for line in (f"results ({status}): {self.run_dir}", f"  tensorboard --logdir {self.run_dir}"):
            self.console.print(Text(printable(line)), highlight=False, soft_wrap=True)


class Quiet(Fanout):
    """Every event to every target, but the console draws no progress bars (the members of a stacked
    sweep group: several members would draw several live bars at once)."""

    def __init__(self, *targets: TrainerEvents):
        super().__init__(*targets)
        self.loud = Fanout(*[x for x in targets if not isinstance(x, ConsoleLogger)])

    def task_start(self, *args: Any) -> None:
        self.loud.task_start(*args)

    def progress(self, *args: Any) -> None:
        self.loud.progress(*args)

    def task_end(self, *args: Any) -> None:
        self.loud.task_end(*args)
