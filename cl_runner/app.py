"""``cl-run``: the command line — arguments, the checks before Hydra makes any folder, what each
outcome prints and its exit code, and the quick exit. The run itself is :mod:`cl_runner.run`, the
config checks :mod:`cl_runner.checks`.

Bad input (unknown option or key, wrong type, out-of-range value, missing data, a folder that cannot
be used) ends in one line ``error: …`` and exit code 2, before any folder is made. In a multirun, a job
that fails records ``metrics.json`` with ``status: failed`` and the sweep goes on, so its summary still
appears; a multirun's exit code says whether every job ended ok.
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from cl_runner import configpath, record
from cl_runner.folders import UsageError, check_folder, check_launcher, check_run_dir, check_sweep_dir
from cl_runner.runfiles import CheckpointError, flatten, write_atomic

CONFIG_MODULE = configpath.CONFIG_MODULE
#: exit codes of cl-run (README: "When things go wrong")
EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 1, 2, 3, 130


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ----------------------------------------------------------------------------- a job
def task(cfg: DictConfig, parts: Any = None, primed: bool = False) -> Any:
    """Hydra's task function: one run, alone or as a job of a sweep. ``primed`` (a stacked sweep
    group): open the run and return ``(phases, first request)`` for the group to drive, or None when
    the job ended already (see :func:`conclude`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cl_runner.run import identity, run_phases
    from cl_runner.trainer import drive

    hc = HydraConfig.get()
    out_dir, multirun = Path(hc.runtime.output_dir), hc.mode == RunMode.MULTIRUN
    job = Job(cfg, out_dir, hc.job.num if multirun else None)
    try:
        phases = run_phases(cfg, out_dir, checked=not multirun, parts=parts, ident=identity(cfg))
        if not primed:
            return drive(phases)
        try:
            return phases, next(phases)
        except StopIteration as stop:  # a resumed run with nothing left to train
            return None, stop.value
    except BaseException as e:  # noqa: BLE001 - conclude() says what each outcome means
        conclude(e, job)
        return None


class Job:
    """Where a run writes and how its lines are labelled (``num``: its job number in a sweep)."""

    def __init__(self, cfg: DictConfig, out_dir: Path, num: int | None):
        self.cfg, self.out_dir, self.num = cfg, out_dir, num
        self.label = f"job {num}: " if num is not None else ""

    @property
    def multirun(self) -> bool:
        return self.num is not None


def conclude(error: BaseException, job: Job) -> None:
    """What cl-run does when a run ended with ``error``: the line it prints and, for a single run, its
    exit code (SystemExit); a sweep goes on with its next job, except after Ctrl-C/SIGTERM, which
    stop the sweep (KeyboardInterrupt)."""
    from cl_runner.data.datasets import DatasetUnavailable
    from cl_runner.run import AlreadyFinished, RunStopped

    if isinstance(error, AlreadyFinished):
        if not job.multirun:
            _exit(EXIT_USAGE, f"error: {error}")
        print(f"{job.label}already finished (status {error.status}) in {job.out_dir}; skipped", file=sys.stderr)
    elif isinstance(error, RunStopped):
        _stopped(error, job, f"(results so far: {job.out_dir})")
    elif isinstance(error, KeyboardInterrupt):  # before the run opened its folder: nothing to keep
        if job.multirun:
            raise error
        _exit(EXIT_INTERRUPTED, "interrupted before training started")
    elif isinstance(error, (ValueError, DatasetUnavailable, CheckpointError)):  # bad input, before the run opened
        if not job.multirun:
            _exit(EXIT_USAGE, f"error: {_one_line(error)}")
        record_failure(job, _one_line(error))
        print(f"error: {job.label}failed: {_one_line(error)}", file=sys.stderr)
    elif isinstance(error, OSError):  # a full disk, a folder that vanished: a fault, not a bug
        print(f"error: {job.label}cannot write results in {job.out_dir}: {_one_line(error)}", file=sys.stderr)
        if not job.multirun:
            sys.exit(EXIT_FAILED)
    elif isinstance(error, Exception):
        _bug(error, job)
    else:
        raise error


def _bug(error: Exception, job: Job) -> None:
    """An error that is neither bad input nor a fault: its traceback (printed for a single run, in the
    job's error.log for a sweep's job)."""
    import traceback

    details = "".join(traceback.format_exception(error))
    try:
        record_failure(job, f"{type(error).__name__}: {_one_line(error)}", details)
    except Exception:  # noqa: BLE001 - never hide the original error
        pass
    if not job.multirun:
        raise error  # a bug, not bad input: keep the traceback
    msg = f"{type(error).__name__}: {_one_line(error)} (see {job.out_dir}/error.log)"
    print(f"error: {job.label}failed: {msg}", file=sys.stderr)


def _stopped(error: Any, job: Job, where: str) -> None:
    """A run that wrote its record and did not end ok (or ended ok while a signal arrived)."""
    if error.status == "ok":  # Ctrl-C / SIGTERM while the results were written: they are complete
        print(f"{job.label}{error} in {job.out_dir}", file=sys.stderr)
        if job.multirun:
            raise KeyboardInterrupt
        return
    if error.status == "interrupted":
        print(f"{job.label}{error} {where}", file=sys.stderr)
        if job.multirun:
            raise KeyboardInterrupt from None  # Ctrl-C stops the whole sweep
        sys.exit(EXIT_INTERRUPTED)
    if error.status == "diverged":
        print(f"error: {job.label}{error} {where}", file=sys.stderr)
        if not job.multirun:
            sys.exit(EXIT_DIVERGED)
        return
    log = f"; see {job.out_dir}/error.log" if error.bug else ""
    print(f"error: {job.label}failed: {error} {where}{log}", file=sys.stderr)
    if not job.multirun:
        sys.exit(EXIT_USAGE if error.bad_input else EXIT_FAILED)


def _exit(code: int, line: str) -> None:
    print(line, file=sys.stderr)
    sys.exit(code)


def record_failure(job: Job, message: str, details: str | None = None) -> None:
    """A job that failed before its run opened its folder: a ``failed`` record keeping any earlier
    attempt's rows (never over a finished run)."""
    from cl_runner.run import identity

    previous = record.read(job.out_dir)
    if record.is_final(previous):
        return
    progress = record.Progress.from_record(previous) if previous else None
    record.write(job.out_dir, record.build("failed", identity(job.cfg), error=message, progress=progress))
    if details:
        write_atomic(job.out_dir / "error.log", details)


hydra_main = hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")(task)


# ----------------------------------------------------------------------------- command line
def config_groups(search: configpath.Search | None = None) -> dict[str, list[str]]:
    """Config groups and their options, from every folder of the search path Hydra composes from:
    cl-runner's configs/, the user's (CL_RUNNER_CONFIG_PATH, installed extensions, and the command
    line's ``hydra.searchpath`` / ``--config-dir`` in ``search``); see :mod:`cl_runner.configpath`."""
    return (search or configpath.Search()).groups()


def _compose(overrides: list[str], hydra_node: bool = False, search: configpath.Search | None = None) -> DictConfig:
    search = search or configpath.Search()
    with configpath.initialized(search.config_dir):
        return hydra.compose(search.config_name, overrides=overrides, return_hydra_config=hydra_node)


def _compose_error(e: Exception, overrides: list, search: configpath.Search | None = None) -> str:
    """One line for a failed composition; an unknown key (OmegaConf names it in the cause) gets the
    closest key of the config the other overrides compose to."""
    key = e.__cause__.full_key if isinstance(e.__cause__, (ConfigAttributeError, ConfigKeyError)) else None
    if key:
        try:  # the keys this command line has (a group choice brings its own keys)
            others = _compose([o.input_line for o in overrides if o.key_or_group != key], search=search)
            keys = list(flatten(OmegaConf.to_container(others, resolve=False)))
        except Exception:
            keys = []
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else "it is not in the config"
        return f"unknown key '{key}': {hint} (`cl-run --cfg job` lists the keys)"
    msg = str(e) if e.__cause__ is None else f"{e} ({e.__cause__})"
    return " ".join(msg.replace("Error merging override", "cannot apply").split())


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


class Plan:
    """What precheck found: the command line to hand to Hydra and, for a sweep, its folder."""

    def __init__(self, argv: list[str], sweep_dir: Path | None = None, warnings: list[str] | None = None):
        self.argv, self.sweep_dir, self.warnings = argv, sweep_dir, warnings or []
        self.done = False  # precheck answered the command itself (--help)


class CommandLine:
    """The overrides of a command line: one representative value per key (the first of a sweep's),
    whether it is a sweep, and the run / sweep folders it names. A group option that does not exist
    is refused here, naming the group's options (from every config folder: :mod:`cl_runner.configpath`);
    ``warnings``: the lines about the user's folders (shadowed options) that cl-run prints once."""

    def __init__(self, args: argparse.Namespace):
        try:
            self.overrides = OverridesParser.create().parse_overrides(args.overrides)
        except OverrideParseException as e:
            raise UsageError(_one_line(e)) from None
        searchpath = [o.input_line for o in self.overrides if o.key_or_group == "hydra.searchpath"]
        self.search = configpath.Search(args.config_dir, args.config_name, searchpath)
        groups, self.warnings = _groups(self.search)
        self.sweep, self.folders, self.representative = bool(args.multirun), {}, list(searchpath)
        for o in self.overrides:
            key = o.key_or_group
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            self.sweep = self.sweep or o.is_sweep_override()
            if key in ("hydra.run.dir", "hydra.sweep.dir"):
                self.folders[key] = values[0]  # a string: Path("") would be the current folder
            if key.startswith("hydra"):
                continue
            if key in groups and not o.is_delete():
                for v in values:
                    if v not in groups[key] and v != "null":
                        raise UsageError(f"{key}={v} is not a known {key}; choose one of: {', '.join(groups[key])}")
            prefix = "+" if o.is_add() else "++" if o.is_force_add() else "~" if o.is_delete() else ""
            self.representative.append(f"{prefix}{key}={values[0]}" if not o.is_delete() else o.input_line)

    def compose(self) -> DictConfig:
        try:
            return _compose(self.representative, hydra_node=self.sweep, search=self.search)
        except Exception as e:  # ConfigCompositionException, OverrideParseException or an OmegaConf error
            parsed = OverridesParser.create().parse_overrides(self.representative)
            raise UsageError(_compose_error(e, parsed, self.search)) from None

    @property
    def task_overrides(self) -> list[str]:
        return [o.input_line for o in self.overrides if not o.key_or_group.startswith("hydra")]


def _groups(search: configpath.Search) -> tuple[dict[str, list[str]], list[str]]:
    """The groups' options and the warning lines about the user's folders; UsageError (one line) for a
    user's folder that does not exist (CL_RUNNER_CONFIG_PATH, hydra.searchpath, --config-dir)."""
    try:
        repo = search.repository()
    except Exception as e:  # a hydra.searchpath that is not a list of strings, a primary config that cannot be read
        raise UsageError(_one_line(e)) from None
    errors, warnings = configpath.problems(repo)
    if errors:
        raise UsageError(errors[0])
    return search.groups(repo), [*warnings, *configpath.shadowing(repo)]


def precheck(argv: list[str]) -> Plan:
    """Check the command line before Hydra runs, so that bad input gives one line and no files. A
    sweep's folder is fixed here (``hydra.sweep.dir``, its default ``${now:…}`` resolved once), so that
    cl-run knows where the sweep's summary is whatever happens to the sweep."""
    args = _parse_args(argv)
    if args.help:
        return _help(argv, args)
    if args.hydra_help or args.version or args.shell_completion:
        return Plan(argv)
    line = CommandLine(args)
    cfg = line.compose()
    if args.cfg or args.info:  # --cfg/--info: the config must compose, nothing runs
        plan = Plan(argv)
    else:
        plan = _check_sweep(argv, line, cfg) if line.sweep else _check_run(argv, line, cfg)
    plan.warnings = line.warnings
    return plan


def _help(argv: list[str], args: argparse.Namespace) -> Plan:
    """``--help``: Hydra's help, with the options of every config folder. Hydra's own lists the groups
    of its initial search path only (not the command line's ``hydra.searchpath``), so the help comes
    from a Hydra whose search path has them all."""
    from hydra._internal.utils import get_args_parser

    line = CommandLine(args)
    line.compose()  # a command line that does not compose: one error line, not Hydra's
    parser = get_args_parser()
    with configpath.initialized(path=line.search.full_path()) as app:
        app.app_help(config_name=line.search.config_name, args_parser=parser, args=parser.parse_args(argv))
    plan = Plan(argv)
    plan.done = True
    return plan


def _check_run(argv: list[str], line: CommandLine, cfg: DictConfig) -> Plan:
    from cl_runner.checks import validate
    from cl_runner.data.datasets import DatasetUnavailable

    try:
        validate(cfg, read_data=True)  # a single run: its data are read here once, kept for the run
    except (ValueError, DatasetUnavailable) as e:
        raise UsageError(_one_line(e)) from None
    run_dir = line.folders.get("hydra.run.dir")
    if run_dir is not None:
        check_folder("hydra.run.dir", run_dir)
        check_run_dir(Path(run_dir), cfg)
    else:
        check_folder("outputs", Path("outputs") / "runs")
    return Plan(argv)


def _check_sweep(argv: list[str], line: CommandLine, cfg: DictConfig) -> Plan:
    given = line.folders.get("hydra.sweep.dir")
    sweep_dir = None if given is None else Path(given)
    if given is not None:
        check_folder("hydra.sweep.dir", given)
    if sweep_dir is None:
        try:
            sweep_dir = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir", throw_on_resolution_failure=True)))
        except Exception as e:  # an interpolation only Hydra's job can resolve
            why = _one_line(e)
            raise UsageError(f"hydra.sweep.dir cannot be resolved before the sweep ({why}); give a folder") from None
        argv = [*argv, f"hydra.sweep.dir={sweep_dir}"]
    check_folder("hydra.sweep.dir", sweep_dir)
    check_sweep_dir(sweep_dir, line.task_overrides)
    check_launcher(cfg)
    return Plan(argv, sweep_dir)


def main() -> None:
    try:
        plan = precheck(sys.argv[1:])
    except UsageError as e:
        _exit(EXIT_USAGE, f"error: {e}")
    if plan.done:
        return
    for warning in plan.warnings:
        print(warning, file=sys.stderr)
    sys.argv = [sys.argv[0], *plan.argv]
    from cl_runner.report import summary

    try:
        hydra_main()
    except KeyboardInterrupt:  # a sweep stopped by Ctrl-C: its summary still shows what finished
        where = ""
        if plan.sweep_dir is not None and plan.sweep_dir.is_dir():
            summary.summarize(plan.sweep_dir, quiet=True)
            where = f" in {plan.sweep_dir}"
        _exit(EXIT_INTERRUPTED, f"interrupted{where}; run the same command again to resume")
    if plan.sweep_dir is not None:  # a finished multirun: 1 when some job did not end ok
        sys.exit(summary.sweep_status(summary.collect(plan.sweep_dir)))


def cli() -> None:
    """The ``cl-run`` console script: :func:`main`, then a quick exit. Python's teardown of the
    interpreter (freeing every module's objects) took 1.2–1.4 s of each ``cl-run`` process once
    ``torch.optim`` had imported ``torch._dynamo`` (measured on a 2-core CPU), after every result was
    written. The exit handlers still run (``logging`` flushes ``app.log``) and the standard streams are
    flushed; only the teardown is skipped. A non-daemon thread still running gets Python's normal exit.
    Signals are ignored from here on: a second Ctrl-C cannot break the exit handlers."""
    try:
        main()
        code: int | str | None = 0
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # a Ctrl-C that landed outside any run (e.g. while Hydra starts)
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
