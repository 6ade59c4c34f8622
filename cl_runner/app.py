"""``cl-run``: compose the config, build stream → model → method → trainer, write the results.

Errors in the user's input (unknown option or key, wrong type, out-of-range value, missing dataset)
end in one line ``error: …`` and exit code 2, without a traceback. In a multirun, a job that fails
records ``metrics.json`` with ``status: failed`` and the sweep goes on, so its summary still appears.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import difflib
import math
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from cl_runner import schema
from cl_runner.data.datasets import DatasetUnavailable
from cl_runner.data.stream import SCENARIOS, check_active_units
from cl_runner.runfiles import (
    CHECKPOINT,
    CONFIG,
    RunLock,
    check_not_busy,
    config_differences,
    flatten,
    load_checkpoint,
    read_status,
    save_checkpoint,
    write_atomic,
)

if TYPE_CHECKING:
    import torch

CONFIG_MODULE = "cl_runner.configs"
USER_ERRORS = (ValueError, DatasetUnavailable)


# ----------------------------------------------------------------------------- validation
def _positive_int(cfg: DictConfig, key: str, optional: bool = False) -> int | None:
    value = cfg.get(key)
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer{' or null' if optional else ''}, got {value!r}")
    return value


def validate(cfg: DictConfig) -> None:
    """Range and type checks Hydra cannot do on plain YAML configs; raises ValueError (one line)."""
    for key in ("epochs", "batch_size", "eval_batch_size", "log_every"):
        _positive_int(cfg, key)
    _positive_int(cfg, "iterations", optional=True)
    _positive_int(cfg, "threads", optional=True)
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if cfg.scenario not in SCENARIOS:
        raise ValueError(f"scenario={cfg.scenario!r} is unknown; choose one of: {', '.join(SCENARIOS)}")
    check_active_units(cfg.get("active_units"), cfg.scenario)
    clip = cfg.get("clip_grad_norm")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < math.inf):
        raise ValueError(f"clip_grad_norm must be a number > 0 (or null: no clipping), got {clip!r}")
    strength = cfg.get("lambda")
    if strength is not None:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise ValueError(f"lambda must be a number >= 0, got {strength!r}")
        if not math.isfinite(strength):
            raise ValueError(f"lambda must be a finite number >= 0, got {strength}")
        if strength < 0:
            raise ValueError(f"lambda must be >= 0, got {strength}")
    from cl_runner.trainer import EVAL_EVERY

    if cfg.get("eval_every") not in EVAL_EVERY:
        raise ValueError(f"eval_every={cfg.get('eval_every')!r} is unknown; choose one of: {', '.join(EVAL_EVERY)}")
    for key in ("reset_optimizer", "download", "keep_checkpoint"):
        if not isinstance(cfg.get(key), bool):
            raise ValueError(f"{key} must be true or false, got {cfg.get(key)!r}")
    resolve_device(cfg.device)
    from cl_runner.data.benchmarks import check_benchmark, input_shape
    from cl_runner.methods import method_from_config
    from cl_runner.models import build_model
    from cl_runner.trainer import make_optimizer_factory

    check_benchmark(cfg.benchmark, cfg.scenario)
    make_optimizer_factory(cfg.optimizer)
    method = method_from_config(cfg.method, strength)
    # options and fit to the input shape, before any data is read or folder made
    method.check_model(build_model(cfg.model, input_shape(cfg.benchmark), 10))


def resolve_device(name: Any) -> torch.device:
    import torch

    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", name):
        raise ValueError(f"device={name!r} is unknown; choose one of: auto, cpu, cuda, cuda:<index>")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} asked for, but no CUDA device is available; use device=auto or cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- the run
#: exit codes of cl-run (README: "When things go wrong")
EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 1, 2, 3, 130
#: a folder whose metrics.json has one of these statuses is never run again
FINISHED = ("ok", "diverged")


class AlreadyFinished(ValueError):
    """The run folder already holds a finished run (a sweep skips it; a single run refuses)."""

    def __init__(self, out_dir: Path, status: str):
        self.status = status
        super().__init__(
            f"{out_dir} already holds a finished run (metrics.json, status {status}); choose another hydra.run.dir"
        )


class RunStopped(Exception):
    """The run ended early and its partial results were saved: ``status`` diverged or interrupted."""

    def __init__(self, status: str, message: str, out_dir: Path):
        self.status, self.out_dir = status, out_dir
        super().__init__(message)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (kill, scancel, preemption) handled like Ctrl-C: stop, keep what is finished."""


@contextlib.contextmanager
def _termination_as_interrupt():
    """Turn SIGTERM into :class:`Interrupted` while a run trains, unless something else (e.g.
    submitit, which relies on its own signals) already handles it."""
    import signal

    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    try:
        previous = signal.getsignal(signal.SIGTERM)
        installed = previous in (signal.SIG_DFL, None)
        if installed:
            signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        installed = False
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


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


def _claim_config(out_dir: Path, resolved: dict[str, Any]) -> None:
    """Save the run's resolved config, or check that a resumed folder was made by the same one."""
    if (out_dir / CONFIG).is_file():
        check_same_config(out_dir, resolved)
    else:
        write_atomic(out_dir / CONFIG, OmegaConf.to_yaml(OmegaConf.create(resolved)))


def run_experiment(cfg: DictConfig, out_dir: str | Path, console=None, checked: bool = False) -> dict[str, Any]:
    """Run one experiment described by a composed config; write its files into ``out_dir``.
    ``checked``: :func:`validate` already passed (cl-run's precheck of a single run), not repeated.

    Resumes from ``out_dir``'s checkpoint when there is one (same config required). Returns the
    content of ``metrics.json``. Raises ValueError/DatasetUnavailable for bad input,
    :class:`AlreadyFinished` for a finished folder, :class:`RunStopped` after saving a diverged or
    interrupted run's partial results.
    """
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
        previous = read_status(out_dir)
        if previous is not None and previous.get("status") in FINISHED:
            raise AlreadyFinished(out_dir, previous["status"])
        resolved = OmegaConf.to_container(cfg, resolve=True)
        _claim_config(out_dir, resolved)
        parts = _PARTS.get() or RunParts()
        threads = torch.get_num_threads()
        wanted = parts.threads or cfg.threads
        if wanted:
            torch.set_num_threads(wanted)
        try:
            return _run(cfg, out_dir, device, console, parts)
        finally:
            torch.set_num_threads(threads)


@dataclass(frozen=True)
class RunParts:
    """What a run builds its task stream and its trainer with. A vectorized group
    (cl_runner/stacked.py) gives its members a shared stream cache and a trainer class whose task
    training it does; every other run uses the defaults."""

    build_stream: Callable[..., Any] | None = None  # None: cl_runner.data.benchmarks.build_stream
    trainer: type | None = None  # None: cl_runner.trainer.Trainer
    threads: int | None = None  # CPU threads of the run's own thread (None: the config's ``threads``)


# Per thread (a group runs each member's job in a thread of its own): set with :func:`using_parts`.
_PARTS: ContextVar[RunParts | None] = ContextVar("cl_runner_run_parts", default=None)


@contextlib.contextmanager
def using_parts(parts: RunParts) -> Iterator[None]:
    """Runs started in this thread inside the block build their stream and trainer with ``parts``."""
    token = _PARTS.set(parts)
    try:
        yield
    finally:
        _PARTS.reset(token)


def _run(cfg: DictConfig, out_dir: Path, device, console, parts: RunParts) -> dict[str, Any]:
    import torch

    from cl_runner.data import benchmarks
    from cl_runner.methods import method_from_config
    from cl_runner.metrics import all_metrics
    from cl_runner.models import build_model
    from cl_runner.report.files import CurvesCSV, write_result_files
    from cl_runner.report.tb import TensorBoardLogger, run_hparams
    from cl_runner.report.terminal import ConsoleLogger, Fanout
    from cl_runner.trainer import Diverged, Trainer, make_optimizer_factory

    build_stream = parts.build_stream or benchmarks.build_stream
    Trainer = parts.trainer or Trainer  # noqa: N806 - a class
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    stream = build_stream(
        cfg.benchmark, cfg.scenario, cfg.seed, device, cfg.data_dir, cfg.download, active_units=cfg.active_units
    )
    model = build_model(cfg.model, stream.input_shape, stream.n_outputs).to(device)
    ident = identity(cfg)
    method = method_from_config(cfg.method, cfg.get("lambda"))
    hparams = run_hparams(ident, method.strength if method.uses_strength else None, cfg)
    saved = load_checkpoint(out_dir, device)
    earlier_wall = float(saved["wall_time_s"]) if saved else 0.0
    console_log = ConsoleLogger(console, run_dir=out_dir)
    # a resumed run hides what the interrupted attempt logged after its checkpoint's last event
    # (at step = steps so far): no curve is drawn twice
    purge = saved["trainer"]["steps"] + 1 if saved else None
    tb = TensorBoardLogger(out_dir, len(stream), cfg.log_every, purge_step=purge)

    def checkpoint(state: dict[str, Any]) -> None:
        tb.writer.flush()  # the events of finished tasks survive a kill -9, like the checkpoint
        save_checkpoint(out_dir, {"trainer": state, "wall_time_s": earlier_wall + time.perf_counter() - start})

    trainer = Trainer(
        model,
        method,
        stream,
        make_optimizer_factory(cfg.optimizer),
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        iterations=cfg.iterations,
        reset_optimizer=cfg.reset_optimizer,
        eval_batch_size=cfg.eval_batch_size,
        seed=cfg.seed,
        events=Fanout(console_log, tb, *([CurvesCSV(out_dir, saved)] if cfg.eval_every == "epoch" else [])),
        checkpoint=checkpoint,
        eval_every=cfg.eval_every,
        clip_grad_norm=cfg.clip_grad_norm,
    )
    if saved:
        done = saved["trainer"]["tasks_done"]
        console_log.console.print(f"resuming {out_dir}: tasks 1–{done} of {len(stream)} finished, continuing")
    status, message = "ok", None
    try:
        try:
            with _termination_as_interrupt():
                trainer.run(resume=saved["trainer"] if saved else None)
        except Diverged as e:
            status, message = "diverged", f"{e}; the run was stopped"
        except KeyboardInterrupt:
            task = min(len(trainer.matrix) + 1, len(stream))
            status = "interrupted"
            message = f"interrupted during task {task}; run the same command again to resume"
        matrix, initial = trainer.matrix, trainer.initial
        undefined = method.undefined_metrics()
        metrics = all_metrics(matrix, initial) if status == "ok" else dict.fromkeys(schema.METRICS)
        metrics.update(dict.fromkeys(undefined))
        result = {
            "status": status,
            "error": message,
            **ident,
            "lambda": hparams["lambda"],
            **metrics,
            "metric_notes": undefined or None,
            "accuracy_matrix": matrix,
            "initial_accuracy": initial,
            "task_names": [task.name for task in stream],
            "tasks_done": len(matrix),
            "steps": trainer.steps,
            "wall_time_s": earlier_wall + time.perf_counter() - start,
            "device": str(device),
        }
        write_result_files(out_dir, result)
        if status == "ok":
            tb.final(result, hparams)
        else:
            tb.failed(hparams, status=status)  # interrupted: "unknown" in HParams, resumable
    except BaseException as e:
        if not isinstance(e, SystemExit):  # SystemExit: submitit requeues the job, which resumes
            tb.failed(hparams)  # the run shows up as failed in the HParams dashboard
        raise
    finally:
        tb.close()
    if status != "ok":
        console_log.where(result)
        raise RunStopped(status, message, out_dir)
    if not cfg.keep_checkpoint:
        (out_dir / CHECKPOINT).unlink(missing_ok=True)
    console_log.final(result)
    return result


def record_failure(cfg: DictConfig, out_dir: Path, message: str, details: str | None = None) -> None:
    """A failed multirun job leaves a metrics.json with status 'failed' (never over a finished run)."""
    from cl_runner.report.files import write_result_files

    previous = read_status(out_dir)
    if previous is not None and previous.get("status") in FINISHED:
        return
    result = {"status": "failed", "error": message, **identity(cfg)}
    result.update(dict.fromkeys((*schema.METRICS, "wall_time_s")))
    write_result_files(out_dir, result)
    if details:
        write_atomic(out_dir / "error.log", details)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


#: set by the jobs of a multirun that run in this process (basic launcher), read by main()
_SWEEP: dict[str, Any] = {}


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun:
        _SWEEP["dir"] = hc.sweep.dir
    job = f"job {hc.job.num}: " if multirun else ""
    try:
        run_experiment(cfg, out_dir, checked=not multirun)  # a single run was validated by precheck
    except AlreadyFinished as e:
        if not multirun:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        print(f"{job}already finished (status {e.status}) in {out_dir}; skipped", file=sys.stderr)
    except RunStopped as e:
        print(f"{'error: ' if e.status == 'diverged' else ''}{job}{e} (results so far: {out_dir})", file=sys.stderr)
        if e.status == "interrupted":
            if multirun:
                raise KeyboardInterrupt from None  # Ctrl-C stops the whole sweep
            sys.exit(EXIT_INTERRUPTED)
        if not multirun:
            sys.exit(EXIT_DIVERGED)
    except KeyboardInterrupt:  # before training started: nothing to keep
        if multirun:
            raise
        print(f"{job}interrupted before training started", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except USER_ERRORS as e:
        if not multirun:
            print(f"error: {_one_line(e)}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        record_failure(cfg, out_dir, _one_line(e))
        print(f"error: {job}failed: {_one_line(e)}", file=sys.stderr)
    except OSError as e:  # a full disk, a folder that vanished: a fault, not a bug
        print(f"error: {job}cannot write results in {out_dir}: {_one_line(e)}", file=sys.stderr)
        if not multirun:
            sys.exit(EXIT_FAILED)
    except Exception as e:
        try:
            record_failure(cfg, out_dir, f"{type(e).__name__}: {_one_line(e)}", traceback.format_exc())
        except Exception:
            pass
        if not multirun:
            raise  # a bug, not bad input: keep the traceback
        print(f"error: {job}failed: {type(e).__name__}: {_one_line(e)} (see {out_dir}/error.log)", file=sys.stderr)


# ----------------------------------------------------------------------------- command line
class UsageError(Exception):
    pass


def config_groups() -> dict[str, list[str]]:
    """Config groups shipped in configs/ and their options (yaml file stems)."""
    root = resources.files(CONFIG_MODULE)
    return {
        d.name: sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith(".yaml"))
        for d in root.iterdir()
        if d.is_dir() and d.name not in ("hydra", "__pycache__")
    }


def _compose(overrides: list[str]) -> DictConfig:
    with hydra.initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return hydra.compose("config", overrides=overrides)


def _compose_error(e: Exception, overrides: list) -> str:
    """One line for a failed composition; an unknown key (OmegaConf names it in the cause) gets the
    closest key of the config the other overrides compose to."""
    key = e.__cause__.full_key if isinstance(e.__cause__, (ConfigAttributeError, ConfigKeyError)) else None
    if key:
        try:  # the keys this command line has (a group choice brings its own keys)
            others = _compose([o.input_line for o in overrides if o.key_or_group != key])
            keys = list(flatten(OmegaConf.to_container(others, resolve=False)))
        except Exception:
            keys = []
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else "it is not in the config"
        return f"unknown key '{key}': {hint} (`cl-run --cfg job` lists the keys)"
    msg = str(e) if e.__cause__ is None else f"{e} ({e.__cause__})"
    return " ".join(msg.replace("Error merging override", "cannot apply").split())


def _check_folder(key: str, folder: Path) -> None:
    """A run or sweep folder must be creatable: probe its nearest existing parent (nothing is left)."""
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(20, "not a directory", str(parent))
        os.rmdir(tempfile.mkdtemp(prefix=".cl-run-probe-", dir=parent))
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise UsageError(f"{key}={folder}: cannot create it in {parent}: {reason}; choose another folder") from None


def _check_run_dir(folder: Path, cfg: DictConfig) -> None:
    """An explicit hydra.run.dir: not in use, not finished, and (to resume) made by the same config."""
    if not folder.exists():
        return
    try:
        check_not_busy(folder)
    except ValueError as e:
        raise UsageError(str(e)) from None
    status = read_status(folder)
    if status is not None and status.get("status") in FINISHED:
        raise UsageError(
            f"hydra.run.dir={folder} already holds finished results (status {status.get('status')}); "
            "choose another folder"
        )
    if (folder / CONFIG).is_file():
        try:
            check_same_config(folder, cfg)
        except ValueError as e:
            raise UsageError(str(e)) from None


def _check_sweep_dir(folder: Path, overrides: list[str]) -> None:
    """An explicit hydra.sweep.dir that holds a sweep can only be resumed by the same sweep."""
    if not folder.exists():
        return
    saved = folder / "multirun.yaml"
    if saved.is_file():
        before = OmegaConf.select(OmegaConf.load(saved), "hydra.overrides.task") or []
        if sorted(map(str, before)) != sorted(overrides):
            raise UsageError(
                f"hydra.sweep.dir={folder} holds another sweep ({' '.join(map(str, before))}); run that sweep's "
                "own command to resume it, or choose another folder"
            )
        return
    finished = sorted(folder.glob("**/metrics.json"))
    if finished:
        raise UsageError(
            f"hydra.sweep.dir={folder} already holds finished results ({finished[0]}); choose another folder"
        )


def _raise(e: Exception):
    raise e


def _parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags of Hydra's command line that decide what precheck checks (Hydra parses them again)."""
    p = argparse.ArgumentParser(add_help=False)
    p.error = lambda message: _raise(UsageError(message))  # one line, like every bad input
    p.add_argument("overrides", nargs="*")
    for flags in (["-h", "--help"], ["--hydra-help"], ["--version"], ["-sc", "--shell-completion"], ["--resolve"]):
        p.add_argument(*flags, action="store_true")
    p.add_argument("-m", "--multirun", action="store_true")
    p.add_argument("-r", "--run", action="store_true")
    for flags in (["-c", "--cfg"], ["-p", "--package"], ["-cp", "--config-path"], ["-cn", "--config-name"]):
        p.add_argument(*flags)
    p.add_argument("-cd", "--config-dir")
    p.add_argument("--experimental-rerun")
    p.add_argument("-i", "--info", nargs="?", const="all")
    return p.parse_args(argv)


def precheck(argv: list[str]) -> None:
    """Check the command line before Hydra runs, so that bad input gives one line and no files."""
    args = _parse_args(argv)
    if args.help or args.hydra_help or args.version or args.shell_completion:
        return
    inspect_only = bool(args.cfg or args.info)  # --cfg/--info: the config must still compose
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as e:
        raise UsageError(_one_line(e)) from None
    groups = config_groups()
    representative, sweep, folders = [], bool(args.multirun), {}
    for o in overrides:
        key = o.key_or_group
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        sweep = sweep or o.is_sweep_override()
        if key in ("hydra.run.dir", "hydra.sweep.dir"):
            folders[key] = Path(values[0])
        if key.startswith("hydra"):
            continue
        if key in groups and not o.is_delete():
            for v in values:
                if v not in groups[key] and v != "null":
                    raise UsageError(f"{key}={v} is not a known {key}; choose one of: {', '.join(groups[key])}")
        prefix = "+" if o.is_add() else "++" if o.is_force_add() else "~" if o.is_delete() else ""
        representative.append(f"{prefix}{key}={values[0]}" if not o.is_delete() else o.input_line)
    try:
        cfg = _compose(representative)
    except Exception as e:  # ConfigCompositionException, OverrideParseException or an OmegaConf error
        raise UsageError(_compose_error(e, OverridesParser.create().parse_overrides(representative))) from None
    if inspect_only:
        return
    if not sweep:
        try:
            validate(cfg)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if sweep:
        sweep_dir = folders.get("hydra.sweep.dir")
        if sweep_dir is not None:
            _check_folder("hydra.sweep.dir", sweep_dir)
            task_overrides = [o.input_line for o in overrides if not o.key_or_group.startswith("hydra")]
            _check_sweep_dir(sweep_dir, task_overrides)
        else:
            _check_folder("outputs", Path("outputs") / "sweeps")
    else:
        run_dir = folders.get("hydra.run.dir")
        if run_dir is not None:
            _check_folder("hydra.run.dir", run_dir)
            _check_run_dir(run_dir, cfg)
        else:
            _check_folder("outputs", Path("outputs") / "runs")


def main() -> None:
    try:
        precheck(sys.argv[1:])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        hydra_main()
    except KeyboardInterrupt:  # a sweep stopped by Ctrl-C: its summary still shows what finished
        sweep_dir = _SWEEP.get("dir")
        where = ""
        if sweep_dir:
            from cl_runner.report.summary import summarize

            summarize(sweep_dir, quiet=True)
            where = f" in {sweep_dir}"
        print(f"interrupted{where}; run the same command again to resume", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    from cl_runner.report import summary as sweep

    if sweep.LAST_ROWS is not None:  # a finished multirun: 1 when some job did not end ok
        sys.exit(sweep.sweep_status(sweep.LAST_ROWS))


def cli() -> None:
    """The ``cl-run`` console script: :func:`main`, then a quick exit. Python's teardown of the
    interpreter (freeing every module's objects) took 1.2–1.4 s of each ``cl-run`` process once
    ``torch.optim`` had imported ``torch._dynamo`` (measured on a 2-core CPU), after every result was
    written. The exit handlers still run (``logging`` flushes ``app.log``) and the standard streams are
    flushed; only the teardown is skipped. A non-daemon thread still running gets Python's normal exit."""
    try:
        main()
        code: int | str | None = 0
    except SystemExit as e:
        code = e.code
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    if not isinstance(code, int):  # sys.exit("message") / sys.exit(None), as Python itself treats them
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    atexit._run_exitfuncs()  # what the interpreter runs at exit, before the teardown os._exit skips
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
