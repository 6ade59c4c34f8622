"""The method contract, written once: what every method must do, checked on a small run. ``cl-run-check``
(:mod:`cl_runner.runcheck`) runs it on a user's method; ``tests/test_contract.py`` on every built-in one.

- **λ = 0 is finetune** (methods with a strength): the same initial accuracies, the same accuracy
  matrix and the same final parameters as ``method=finetune``, bitwise.
- **An importance pass leaves the model as found** (``before_task`` and ``after_task`` on every task):
  the very same parameter objects (the ones the optimizer holds), the same values, buffers and
  gradients, each module's own training flag (the contract puts one module in eval mode first, so
  ``model.train()`` at the end is caught), the global random generators (torch's, Python's, NumPy's);
  and every forward pass of the model inside it runs in eval mode (:func:`cl_runner.methods.eval_mode`).
- **Resume**: a run interrupted (SIGINT, at the start of task 2: :mod:`cl_runner.faults`) and run again
  in its folder ends with the accuracy matrix and the final parameters of an uninterrupted run, bitwise.
- **Divergence** (methods with a strength): the interrupted run's checkpoint with every floating-point
  tensor of the method's state made NaN, resumed, must end ``diverged`` (the trainer reads the
  penalty), not ``ok`` and not ``failed``.
- **Checkpoints** (the interrupted one, after task 1, and the finished run's) load with
  ``torch.load(..., weights_only=True)``.

Each contract gives an :class:`Outcome`: ``ok``, ``FAIL`` with what differed, or ``skip`` with why it
does not apply.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from cl_runner import faults
from cl_runner.asfound import Snapshot, compare, forwards_in_train_mode, names
from cl_runner.runfiles import CHECKPOINT, CheckpointError, load_checkpoint, save_checkpoint
from cl_runner.schema import printable

LAMBDA_ZERO = "λ = 0 reproduces finetune"
IMPORTANCE = "importance pass leaves the model as found"
RESUME = "resume after an interruption gives the same matrix"
DIVERGENCE = "a non-finite penalty is reported as divergence"
CHECKPOINTS = "the method's checkpoints load with weights_only=True"
ORDER = (LAMBDA_ZERO, IMPORTANCE, RESUME, DIVERGENCE, CHECKPOINTS)
#: where the resume contract interrupts the run: at the start of task 2's training (after task 1's checkpoint)
INTERRUPT = "train@2:sigint"

Compose = Callable[[Sequence[str]], DictConfig]

#: small runs for the contract (cl-run-check's defaults): 3 tasks of the offline digits, 32 training
#: and 32 test images per task, 1 epoch of batches of 8, class-IL, one thread, CPU
TINY = [
    "benchmark=split_digits",
    "benchmark.n_tasks=3",
    "benchmark.max_train_per_task=32",
    "benchmark.max_test_per_task=32",
    "scenario=class",
    "epochs=1",
    "batch_size=8",
    "threads=1",
    "device=cpu",
]


@dataclass
class Outcome:
    """One contract's result: ``status`` ok / FAIL / skip; ``detail``: what differed, or why skipped."""

    name: str
    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"

    def line(self) -> str:
        return f"{self.status:<4} {self.name}" + (f": {self.detail}" if self.detail else "")


def _ok(name: str) -> Outcome:
    return Outcome(name, "ok")


def _fail(name: str, detail: str) -> Outcome:
    return Outcome(name, "FAIL", detail)


def _skip(name: str, detail: str) -> Outcome:
    return Outcome(name, "skip", detail)


def _text(e: BaseException) -> str:
    return printable(" ".join(str(e).split())) or type(e).__name__


# ----------------------------------------------------------------------------- runs
@dataclass
class Finished:
    """A finished run: its record (metrics.json) and its final model parameters and buffers."""

    record: dict[str, Any]
    model: dict[str, torch.Tensor]


def _quiet() -> Any:
    from rich.console import Console

    return Console(file=io.StringIO(), markup=False)


@contextlib.contextmanager
def _fault(spec: str | None) -> Iterator[None]:
    """:data:`cl_runner.faults.ENV` set to ``spec`` (unset for None) while the block runs."""
    before = os.environ.pop(faults.ENV, None)
    if spec:
        os.environ[faults.ENV] = spec
    try:
        yield
    finally:
        os.environ.pop(faults.ENV, None)
        if before is not None:
            os.environ[faults.ENV] = before


def _keeping(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``keep_checkpoint=true`` (the final parameters stay readable)."""
    cfg = cfg.copy()
    cfg.keep_checkpoint = True
    return cfg


def run(cfg: DictConfig, folder: Path, fault: str | None = None) -> Finished:
    """Run ``cfg`` in ``folder`` quietly (the final checkpoint kept); RunStopped unless it ends ok."""
    from cl_runner.run import RunParts, run_experiment

    with _fault(fault):
        record = run_experiment(_keeping(cfg), folder, console=_quiet(), parts=RunParts(figures=False))
    try:
        model = load_checkpoint(folder / CHECKPOINT)["trainer"]["model"]
    except CheckpointError:  # the checkpoint contract says why; the matrices are still compared
        model = {}
    return Finished(record, model)


def _ended(e: BaseException) -> str:
    status = getattr(e, "status", None)
    return f"the run ended {status}: {_text(e)}" if status else f"the run raised {type(e).__name__}: {_text(e)}"


def _differences(a: Finished, b: Finished, what: str) -> str | None:
    """What differs between two runs that should be bitwise equal (None: nothing)."""
    for key, label in (
        ("initial_accuracy", "initial accuracies differ"),
        ("accuracy_matrix", "accuracy matrix differs"),
    ):
        if a.record[key] != b.record[key]:
            rows = [i + 1 for i, (x, y) in enumerate(zip(a.record[key], b.record[key], strict=False)) if x != y]
            where = f" (rows {', '.join(map(str, rows))})" if key == "accuracy_matrix" and rows else ""
            return f"the {label} from {what}'s{where}: {b.record[key]} vs {a.record[key]}"
    changed = [k for k in a.model if k not in b.model or not torch.equal(a.model[k], b.model[k])]
    if changed:
        return f"the final parameters differ from {what}'s ({names(changed)})"
    return None


# ----------------------------------------------------------------------------- λ = 0
def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the overrides that choose or set the method: ``method``, ``method.*``, ``lambda``, ``row``; the rest)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    mine, rest = [], []
    for o in parsed:
        key = o.key_or_group
        own = key in ("method", "lambda", "row") or key.startswith(("method.", "method/", "protocol"))
        (mine if own else rest).append(o.input_line)
    return mine, rest


def lambda_zero(compose: Compose, overrides: Sequence[str], folder: Path, finetune: Finished | None = None) -> Outcome:
    """λ = 0 against finetune on the same settings (``finetune``: its run, when already made)."""
    from cl_runner.methods import method_from_config

    mine, rest = split_overrides(overrides)
    cfg = compose([*mine, *rest])
    if not method_from_config(cfg.method, cfg.get("lambda")).uses_strength:
        return _skip(LAMBDA_ZERO, f"method {cfg.method.get('name')} has no strength")
    try:
        finetune = finetune or run(compose([*rest, "method=finetune"]), folder / "finetune")
        zero = run(compose([*mine, *rest, "lambda=0"]), folder / "lambda0")
    except Exception as e:  # noqa: BLE001 - a run that did not end ok is the finding
        return _fail(LAMBDA_ZERO, _ended(e))
    if zero.record.get("lambda") != 0:
        return _fail(LAMBDA_ZERO, f"with lambda=0 the run records lambda {zero.record.get('lambda')}")
    differs = _differences(finetune, zero, "finetune")
    return _fail(LAMBDA_ZERO, f"with lambda=0, {differs}") if differs else _ok(LAMBDA_ZERO)


# ----------------------------------------------------------------------------- importance passes
def importance_pass(cfg: DictConfig) -> Outcome:
    """``before_task`` and ``after_task`` on every task of ``cfg``'s stream leave the model as found."""
    threads = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    try:
        return _importance_pass(cfg)
    finally:
        torch.set_num_threads(threads)


def _importance_pass(cfg: DictConfig) -> Outcome:
    from cl_runner.checks import resolve_device
    from cl_runner.data.benchmarks import build_stream
    from cl_runner.methods import method_from_config
    from cl_runner.models import build_model
    from cl_runner.optimizers import make_optimizer_factory

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    stream = build_stream(
        cfg.benchmark, cfg.scenario, cfg.seed, device, cfg.data_dir, cfg.download, cfg.get("active_units", "seen")
    )
    model = build_model(cfg.model, stream.input_shape, stream.n_outputs).to(device)
    method = method_from_config(cfg.method, cfg.get("lambda"))
    method.setup(model, stream, seed=cfg.seed)
    optimizer = make_optimizer_factory(cfg.optimizer)(model)
    model.train()
    model(stream[0].x_train[:8]).sum().backward()  # gradients to keep
    leaves = [m for m in model.modules() if not list(m.children())]
    leaves[-1].eval()  # a module in eval mode: a pass must restore each module's own flag
    before = Snapshot.of(model)
    try:
        with forwards_in_train_mode(model) as trained:
            for task in stream:
                method.before_task(model, task)
                method.after_task(model, task)
    except Exception as e:  # noqa: BLE001 - a pass that raises is the finding
        return _fail(IMPORTANCE, f"before_task/after_task raised {type(e).__name__}: {_text(e)}")
    found = compare(before, model, optimizer)
    if trained:
        found.insert(0, f"the model ran forward in train mode inside it ({names(trained)}); use eval_mode(model)")
    return _fail(IMPORTANCE, "; ".join(found)) if found else _ok(IMPORTANCE)


# ----------------------------------------------------------------------------- resume, divergence, checkpoints
def _poison(state: Any) -> tuple[Any, int]:
    """``state`` with every floating-point tensor filled with NaN, and how many there were."""
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        return torch.full_like(state, float("nan")), 1
    if isinstance(state, dict):
        pairs = {k: _poison(v) for k, v in state.items()}
        return {k: v for k, (v, _) in pairs.items()}, sum(n for _, n in pairs.values())
    if isinstance(state, (list, tuple)):
        pairs = [_poison(v) for v in state]
        return type(state)(v for v, _ in pairs), sum(n for _, n in pairs)
    return state, 0


def _weights_only(paths: Sequence[Path]) -> Outcome:
    for path in paths:
        try:
            torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - the unpickler names the object it refused
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            why = next((line for line in lines if "Unsupported global" in line), lines[-1])
            why = why.split("Unsupported global: ", 1)[-1].split(" was not an allowed global")[0]
            return _fail(
                CHECKPOINTS, f"{path.name} of the {path.parent.name} run does not: it holds {printable(why)[:300]}"
            )
    return _ok(CHECKPOINTS)


def _diverges(cfg: DictConfig, folder: Path) -> Outcome:
    """Resume ``folder`` (an interrupted run) with the method's state made non-finite: must diverge."""
    from cl_runner.run import RunStopped, run_experiment

    try:
        state = load_checkpoint(folder / CHECKPOINT)
    except CheckpointError:
        return _skip(DIVERGENCE, "the checkpoint cannot be read safely (see the checkpoint contract)")
    state["trainer"]["method"], count = _poison(state["trainer"]["method"])
    if not count:
        return _skip(DIVERGENCE, "the method's checkpointed state holds no floating-point tensor to make non-finite")
    save_checkpoint(folder, state)
    try:
        record = run_experiment(_keeping(cfg), folder, console=_quiet())
    except RunStopped as e:
        if e.status == "diverged":
            return _ok(DIVERGENCE)
        return _fail(DIVERGENCE, f"with NaN in its state the run ended {e.status}, not diverged: {_text(e)}")
    except Exception as e:  # noqa: BLE001 - the finding
        return _fail(DIVERGENCE, f"with NaN in its state the run raised {type(e).__name__}: {_text(e)}")
    return _fail(DIVERGENCE, f"with NaN in every floating-point tensor of its state the run ended {record['status']}")


def resume_contracts(cfg: DictConfig, folder: Path) -> list[Outcome]:
    """Resume, divergence and checkpoint contracts (they share the interrupted run), in that order."""
    from cl_runner.methods import method_from_config
    from cl_runner.run import RunStopped

    strength = method_from_config(cfg.method, cfg.get("lambda")).uses_strength
    try:
        reference = run(cfg, folder / "reference")
    except Exception as e:  # noqa: BLE001 - the method cannot even run: every contract fails with why
        why = _ended(e)
        return [
            _fail(RESUME, why),
            _fail(DIVERGENCE, why) if strength else _skip(DIVERGENCE, "no strength"),
            _fail(CHECKPOINTS, why),
        ]
    resumed = folder / "resumed"
    try:
        run(cfg, resumed, fault=INTERRUPT)
        stopped = None
    except Exception as e:  # noqa: BLE001 - RunStopped(interrupted) is the expected ending
        stopped = e
    if not isinstance(stopped, RunStopped) or stopped.status != "interrupted":
        how = "it ended ok" if stopped is None else _ended(stopped)
        return [
            _fail(RESUME, f"the run was not interrupted at task 2 ({how})"),
            _skip(DIVERGENCE, "no interrupted run"),
            _weights_only([folder / "reference" / CHECKPOINT]),
        ]
    checkpoints = _weights_only([resumed / CHECKPOINT, folder / "reference" / CHECKPOINT])
    if strength:
        shutil.copytree(resumed, folder / "poisoned")
    try:
        again = run(cfg, resumed)
        differs = _differences(reference, again, "the uninterrupted run")
        outcome = _fail(RESUME, differs) if differs else _ok(RESUME)
    except Exception as e:  # noqa: BLE001 - the finding
        outcome = _fail(RESUME, f"the resumed run did not finish: {_ended(e)}")
    divergence = (
        _diverges(cfg, folder / "poisoned")
        if strength
        else _skip(DIVERGENCE, f"method {cfg.method.get('name')} has no strength (no penalty)")
    )
    return [outcome, divergence, checkpoints]


# ----------------------------------------------------------------------------- all of them
def check_method(compose: Compose, overrides: Sequence[str], folder: Path) -> list[Outcome]:
    """Every contract for the method of ``compose(overrides)``, runs in ``folder``; in :data:`ORDER`."""
    cfg = compose(list(overrides))
    folder = Path(folder)
    outcomes = [lambda_zero(compose, overrides, folder), importance_pass(cfg), *resume_contracts(cfg, folder)]
    return sorted(outcomes, key=lambda o: ORDER.index(o.name))


__all__ = [
    "Outcome",
    "Finished",
    "TINY",
    "ORDER",
    "check_method",
    "importance_pass",
    "lambda_zero",
    "resume_contracts",
    "run",
    "split_overrides",
]
