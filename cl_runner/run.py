"""One run in its folder: open the folder → build stream, model, method, loggers and trainer → train
→ write its record, as one sequence of phases (:func:`run_phases`, a generator that yields each
task's training request; :func:`run_experiment` drives it with the trainer's own loop).

Every way a run can end goes through one place, :func:`_execute`'s handler, and leaves one record
(:mod:`cl_runner.record`) with the rows finished so far:

- ``ok``; ``diverged`` for a non-finite number wherever it arose (loss, penalty, importance, an
  operation that refused NaN input, parameters that became non-finite); ``interrupted`` (Ctrl-C,
  SIGTERM: resumable); ``failed`` (anything else, also bad input found only while building: the
  rows of an earlier attempt are kept, the traceback goes to ``error.log`` when it is a bug).
- Results are written with signals deferred (:func:`cl_runner.stopping.deferred`): a Ctrl-C that
  lands while the record is written lets the write finish first.

:class:`RunStopped` is raised after the record of a run that did not end ``ok`` was written (and for an
``ok`` run during whose final writes a signal arrived: the caller decides whether to go on).
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from cl_runner import faults, record, schema, stopping
from cl_runner.checks import resolve_device, validate
from cl_runner.data.datasets import DatasetUnavailable
from cl_runner.runfiles import (
    CONFIG,
    CheckpointError,
    RunLock,
    checkpoint_path,
    config_differences,
    load_checkpoint,
    remove_checkpoints,
    save_checkpoint,
    write_atomic,
)

if TYPE_CHECKING:
    from cl_runner.trainer import Phases

#: what a resumed run reads (the top-level key ``resume``): the latest checkpoint, the one before it,
#: or none (every task trained again)
RESUME = ("auto", "previous", "restart")


class AlreadyFinished(ValueError):
    """The run folder already holds a finished run (a sweep skips it; a single run refuses)."""

    def __init__(self, out_dir: Path, status: str):
        self.status = status
        super().__init__(
            f"{out_dir} already holds a finished run (metrics.json, status {status}); choose another hydra.run.dir"
        )


class RunStopped(Exception):
    """The run ended early and its record (with the finished rows) was written: ``status`` diverged,
    interrupted or failed; or ``ok`` when a signal arrived while the finished run's results were
    written (they are complete)."""

    def __init__(self, status: str, message: str, out_dir: Path, bug: bool = False, bad_input: bool = False):
        self.status, self.out_dir, self.bug, self.bad_input = status, out_dir, bug, bad_input
        super().__init__(message)


@dataclass(frozen=True)
class RunParts:
    """What a run builds its task stream with (a sweep group shares one stream per benchmark:
    ``build_stream``), whether it draws progress bars (``quiet``: a stacked group's members), and whether
    it renders the matrix's pictures for TensorBoard (``figures``: not for the contract's runs, which only
    compare records; the pictures are half of a tiny run's time)."""

    build_stream: Callable[..., Any] | None = None  # None: cl_runner.data.benchmarks.build_stream
    quiet: bool = False
    figures: bool = True


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The run's :data:`cl_runner.schema.IDENTITY` fields; the experiment is Hydra's choice of that group."""
    from hydra.core.hydra_config import HydraConfig

    experiment = HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
    return schema.identity(cfg, experiment)


def check_same_config(folder: Path, cfg: DictConfig | dict[str, Any]) -> None:
    """ValueError naming the keys (old → new) if ``folder``'s saved config differs from ``cfg``."""
    saved = OmegaConf.to_container(OmegaConf.load(folder / CONFIG), resolve=False)
    new = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    diffs = config_differences(saved, new)
    if diffs:
        more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        raise ValueError(
            f"{folder} holds a run with another config: {'; '.join(diffs[:4])}{more}; rerun that run's own "
            "command to resume it, or choose another folder"
        )


def resume_checkpoint(out_dir: Path, how: str, device: Any = None) -> dict[str, Any] | None:
    """The checkpoint a run in ``out_dir`` continues from (``resume``: auto | previous | restart);
    :class:`CheckpointError` (one line, with the way out) when it cannot be read."""
    if how == "restart":
        return None
    path = checkpoint_path(out_dir, previous=how == "previous")
    if path is None and how == "previous":
        raise CheckpointError(f"resume=previous: {out_dir} holds no earlier checkpoint (checkpoint.prev.pt)")
    try:
        return load_checkpoint(path, device)
    except CheckpointError as e:
        other = checkpoint_path(out_dir, previous=True) if how == "auto" else None
        way = "resume=previous (continue from the checkpoint one task earlier) or " if other else ""
        kept = "the finished rows are kept in metrics.json"
        raise CheckpointError(f"{e}; {kept}; rerun with {way}resume=restart") from None


def run_experiment(cfg: DictConfig, out_dir: str | Path, console=None, checked: bool = False, **kw: Any) -> dict:
    """Run one experiment described by a composed config; write its files into ``out_dir``; return its
    record (the content of ``metrics.json``). ``checked``: :func:`~cl_runner.checks.validate` already
    passed. Raises ValueError for bad input, :class:`AlreadyFinished` for a finished folder,
    :class:`RunStopped` after writing the record of a run that did not end ok."""
    from cl_runner.trainer import drive

    return drive(run_phases(cfg, out_dir, console=console, checked=checked, **kw))


def run_phases(
    cfg: DictConfig,
    out_dir: str | Path,
    *,
    console=None,
    checked: bool = False,
    parts: RunParts | None = None,
    ident: dict[str, Any] | None = None,
) -> Phases:
    """:func:`run_experiment` as phases: yields a :class:`~cl_runner.trainer.TaskTraining` request per
    task to train, returns the record."""
    import torch

    out_dir = Path(out_dir)
    if not checked:
        validate(cfg)
    device = resolve_device(cfg.device)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the run folder {out_dir}: {(e.strerror or str(e)).lower()}") from None
    with RunLock(out_dir):
        previous = record.read(out_dir)
        if record.is_final(previous):
            raise AlreadyFinished(out_dir, previous["status"])
        if (out_dir / CONFIG).is_file():  # a folder of another config is refused before anything is written
            check_same_config(out_dir, cfg)
        threads = torch.get_num_threads()
        if isinstance(cfg.get("threads"), int):
            torch.set_num_threads(int(cfg.threads))
        try:
            run = _Run(cfg, out_dir, device, console, parts or RunParts(), ident or identity(cfg), previous)
            return (yield from run.execute())
        finally:
            torch.set_num_threads(threads)


class _Run:
    """The state of one open run (its folder is locked by :func:`run_phases`)."""

    def __init__(self, cfg, out_dir: Path, device, console, parts: RunParts, ident: dict, previous: dict | None):
        self.cfg, self.out_dir, self.device, self.console, self.parts = cfg, out_dir, device, console, parts
        self.ident, self.previous = ident, previous
        self.start = time.perf_counter()
        self.earlier_wall = 0.0
        self.trainer = self.method = self.tb = self.console_log = self.stream = None
        self.hparams: dict[str, Any] = {}
        self.bad_input = False

    # ------------------------------------------------------------------ build
    def _build(self) -> dict[str, Any] | None:
        """Stream, model, method, loggers and trainer; returns the checkpoint to resume from."""
        import torch

        from cl_runner.data import benchmarks
        from cl_runner.methods import method_from_config
        from cl_runner.models import build_model
        from cl_runner.report.files import CurvesCSV
        from cl_runner.report.tb import TensorBoardLogger, run_hparams
        from cl_runner.report.terminal import ConsoleLogger, Fanout, Quiet
        from cl_runner.trainer import Trainer, make_optimizer_factory

        cfg, out_dir = self.cfg, self.out_dir
        how = cfg.get("resume", "auto")
        saved = resume_checkpoint(out_dir, how, self.device)
        if how == "restart":
            remove_checkpoints(out_dir)
        # the wall time of the attempts before, as saved with the checkpoint
        self.earlier_wall = float(saved.get("wall_time_s") or 0.0) if saved else 0.0
        torch.manual_seed(cfg.seed)
        build_stream = self.parts.build_stream or benchmarks.build_stream
        self.stream = stream = build_stream(
            cfg.benchmark, cfg.scenario, cfg.seed, self.device, cfg.data_dir, cfg.download, cfg.active_units
        )
        model = build_model(cfg.model, stream.input_shape, stream.n_outputs).to(self.device)
        if cfg.get("threads") == "auto" and small_model(model, self.device):
            torch.set_num_threads(1)
        self.method = method_from_config(cfg.method, cfg.get("lambda"))
        self.hparams = run_hparams(self.ident, self.method.strength if self.method.uses_strength else None, cfg)
        self._claim_config()
        self.console_log = ConsoleLogger(self.console, run_dir=out_dir)
        # a resumed run hides what an interrupted attempt logged after its checkpoint (at step = steps so far)
        purge = saved["trainer"]["steps"] + 1 if saved else None
        self.tb = TensorBoardLogger(out_dir, len(stream), cfg.log_every, purge_step=purge)
        loggers = [self.console_log, self.tb, *([CurvesCSV(out_dir, saved)] if cfg.eval_every == "epoch" else [])]
        events = Quiet(*loggers) if self.parts.quiet else Fanout(*loggers)
        self.trainer = Trainer(
            model,
            self.method,
            stream,
            make_optimizer_factory(cfg.optimizer),
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            iterations=cfg.iterations,
            reset_optimizer=cfg.reset_optimizer,
            eval_batch_size=cfg.eval_batch_size,
            seed=cfg.seed,
            events=events,
            checkpoint=self._checkpoint,
            eval_every=cfg.eval_every,
            clip_grad_norm=cfg.clip_grad_norm,
        )
        if saved:
            done = saved["trainer"]["tasks_done"]
            self.console_log.console.print(f"resuming {out_dir}: tasks 1–{done} of {len(stream)} finished, continuing")
        return saved

    def _claim_config(self) -> None:
        """Save the run's resolved config (a resumed folder's was checked before the run opened). After
        building: a config refused while building claims nothing, so the corrected command may use the
        folder."""
        if not (self.out_dir / CONFIG).is_file():
            resolved = OmegaConf.to_container(self.cfg, resolve=True)
            write_atomic(self.out_dir / CONFIG, OmegaConf.to_yaml(OmegaConf.create(resolved)))

    def _checkpoint(self, state: dict[str, Any]) -> None:
        self.tb.commit()  # the events of finished tasks survive a kill -9, like the checkpoint
        save_checkpoint(self.out_dir, {"trainer": state, "wall_time_s": self._wall()})

    def _wall(self) -> float:
        return self.earlier_wall + time.perf_counter() - self.start

    # ------------------------------------------------------------------ the phases
    def execute(self) -> Generator[Any, Any, dict[str, Any]]:
        status, message, bug = "ok", None, None
        try:
            with stopping.interruptible():
                saved = self._build()
                faults.point("setup")
                yield from self.trainer.schedule(resume=saved["trainer"] if saved else None)
        except GeneratorExit:  # the driver went away mid-run (a group's Ctrl-C): the finished rows stay
            self._finish("interrupted", "interrupted; run the same command again to resume")
            raise
        except SystemExit:  # submitit's requeue: the checkpoint is what resumes; no record
            if self.tb is not None:
                self.tb.close()
            raise
        except BaseException as e:  # noqa: BLE001 - every ending becomes a record (module docstring)
            status, message, bug = self._outcome(e)
            self.bad_input = isinstance(e, (ValueError, DatasetUnavailable))
        return self._finish(status, message, bug)

    def _outcome(self, e: BaseException) -> tuple[str, str, str | None]:
        """(status, one-line message, traceback for a bug) of a run that raised ``e``."""
        from cl_runner.trainer import Diverged

        if isinstance(e, Diverged):
            return "diverged", f"{e}; the run was stopped", None
        if isinstance(e, KeyboardInterrupt):
            done = len(self.trainer.matrix) if self.trainer else 0
            task = min(done + 1, len(self.stream)) if self.stream else 1
            return "interrupted", f"interrupted during task {task}; run the same command again to resume", None
        text = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, (ValueError, DatasetUnavailable)):  # bad input found while building
            return "failed", text, None
        if isinstance(e, OSError):  # a full disk, a folder that vanished: a fault, not a bug
            return "failed", f"{type(e).__name__}: {text}", None
        if _nonfinite(e, self.trainer):
            done = len(self.trainer.matrix) if self.trainer else 0
            return "diverged", f"diverged: non-finite values in task {done + 1} ({type(e).__name__}: {text})", None
        return "failed", f"{type(e).__name__}: {text}", traceback.format_exc()

    def _progress(self) -> record.Progress:
        t = self.trainer
        if t is None or (not t.initial and self.previous):  # nothing new: the earlier attempt's rows
            return record.Progress.from_record(self.previous or {})
        names = [task.name for task in self.stream] if self.stream else []
        return record.Progress(list(t.initial), [list(r) for r in t.matrix], names, t.steps)

    def _finish(self, status: str, message: str | None, bug: str | None = None) -> dict[str, Any]:
        """Write the record (signals deferred), close the loggers; raise :class:`RunStopped` unless ok."""
        from cl_runner.metrics import all_metrics

        progress = self._progress()
        notes = self.method.undefined_metrics() if self.method else {}
        metrics = all_metrics(progress.matrix, progress.initial) if status == "ok" else None
        ident = {**self.ident, "lambda": self.hparams.get("lambda", self.ident.get("lambda"))}
        result = record.build(
            status,
            ident,
            error=message,
            progress=progress,
            metrics=metrics,
            notes=notes,
            wall_time_s=self._wall(),
            device=str(self.device),
        )
        with stopping.deferred():  # a signal now waits until the results are written and said
            try:
                faults.point("record")
                record.write(self.out_dir, result)
                if bug:
                    write_atomic(self.out_dir / "error.log", bug)
                self._tensorboard(status, result)
                faults.point("written")
            finally:
                if self.tb is not None:
                    self.tb.close()
            if status == "ok":
                keep = bool(self.cfg.get("keep_checkpoint"))
                remove_checkpoints(self.out_dir) if not keep else _drop_previous(self.out_dir)
            if self.console_log is not None:
                self.console_log.final(result) if status == "ok" else self.console_log.where(result)
        late = stopping.received()
        if status != "ok":
            raise RunStopped(status, message or status, self.out_dir, bug=bug is not None, bad_input=self.bad_input)
        if late:
            raise RunStopped("ok", f"{late} received while the results were written; they are complete", self.out_dir)
        return result

    def _tensorboard(self, status: str, result: dict[str, Any]) -> None:
        """The run's last TensorBoard records (matrix pictures, HParams); a failure there is reported,
        never fatal: the record is written already."""
        if self.tb is None:
            return
        try:
            if status == "ok":
                self.tb.final(result, self.hparams, self.parts.figures)
            else:
                self.tb.failed(self.hparams, status)
        except Exception as e:  # noqa: BLE001 - figures are a view of the record
            print(f"warning: TensorBoard summary not written: {type(e).__name__}: {e}", file=sys.stderr)


#: ``threads=auto``: models with fewer trainable parameters than this train on one CPU thread. Their
#: operations are too small to gain from a second thread, and PyTorch's default of one OpenMP thread per
#: core spins against any other process on the machine (README, "Speed": measured with
#: ``scripts/bench_runner.py --load``)
SMALL_MODEL = 2_000_000


def small_model(model: Any, device: Any) -> bool:
    """``threads=auto`` trains on one CPU thread (else PyTorch's default, one per core): a model under
    :data:`SMALL_MODEL` trainable parameters, on the CPU."""
    import torch

    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return torch.device(device).type == "cpu" and n < SMALL_MODEL


def _drop_previous(out_dir: Path) -> None:
    from cl_runner.runfiles import PREVIOUS_CHECKPOINT

    (out_dir / PREVIOUS_CHECKPOINT).unlink(missing_ok=True)


_NONFINITE_WORDS = ("nan", "inf", "overflow", "non-finite", "not finite")


def _nonfinite(e: BaseException, trainer: Any) -> bool:
    """True when ``e`` came from non-finite numbers: the model's parameters are no longer finite, or
    torch refused an input for holding inf/NaN (sampling from a NaN softmax, a float overflow)."""
    import torch

    if trainer is not None:
        with contextlib.suppress(Exception):
            if not all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters()):
                return True
    words = str(e).lower().replace("`", " ").replace(",", " ").split()
    return isinstance(e, (RuntimeError, FloatingPointError, OverflowError)) and any(
        w.strip(".:;()") in _NONFINITE_WORDS for w in words
    )
