"""Sweeps on Slurm (``hydra/launcher=slurm``): the decisions the launcher plugin makes around
hydra-submitit-launcher, as plain functions (the plugin is ``hydra_plugins/cl_runner_launcher``).

- :func:`sbatch_error`: an sbatch rejection → one line naming the ``hydra.launcher.*`` key to change.
- :func:`stuck_reason`: pending reasons that never resolve by waiting (the request exceeds a partition
  or association limit) → the same kind of line; the launcher then cancels the array.
- :func:`outcome`: a finished job's Slurm state + the status its ``metrics.json`` holds → the status
  to record (``cancelled`` / ``timeout`` / ``failed``), or None to keep what the run wrote.
- :func:`record_outcome`: writes that status into the job folder (creating it for a job cancelled
  while pending), keeping the finished rows the run saved (``metrics.json`` or ``checkpoint.pt``).
- :func:`job_name`, :func:`safe_name`, :func:`default_mem_gb`: names shown in squeue/sacct (a safe
  character set, bounded length: a name is a line of the job's sbatch script), memory from the benchmark.
- :func:`script_problem`: a launcher setting that would break out of its ``#SBATCH`` line → one line.

No torch or submitit import at module level: Hydra imports the plugin at every start.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: the one status the launcher relabels when Slurm says why a job stopped (cancelled or timeout);
#: every other recorded status is kept
RELABELLED = "interrupted"

# sbatch's message (lower case) → the launcher keys that decide it
_SBATCH_KEYS = (
    ("invalid partition", ("partition",)),
    ("generic resource", ("gpus_per_node",)),
    ("gres", ("gpus_per_node",)),
    ("account", ("account",)),
    ("qos", ("qos",)),
    ("time limit", ("timeout_min",)),
    ("more processors", ("cpus_per_task",)),
    ("cpu count", ("cpus_per_task",)),
    ("memory", ("mem_gb",)),
    ("feature", ("constraint",)),
    ("node configuration is not available", ("cpus_per_task", "mem_gb", "gpus_per_node")),
)

#: pending reasons that waiting cannot resolve (the request itself exceeds a limit) → keys to change
STUCK_REASONS = {
    "PartitionConfig": ("partition", "cpus_per_task", "mem_gb", "gpus_per_node"),
    "PartitionNodeLimit": ("partition", "nodes"),
    "PartitionTimeLimit": ("partition", "timeout_min"),
    "BadConstraints": ("constraint", "cpus_per_task", "mem_gb"),
    "InvalidAccount": ("account",),
    "InvalidQOS": ("qos",),
    "AccountNotAllowed": ("account", "partition"),
    "QOSNotAllowed": ("qos", "partition"),
}
_PER_JOB_LIMIT = ("timeout_min", "cpus_per_task", "mem_gb", "gpus_per_node", "qos", "account")


def launcher_keys(keys: Iterable[str], params: Mapping[str, Any]) -> str:
    """``hydra.launcher.partition=debug`` or ``hydra.launcher.cpus_per_task=4 / mem_gb=2``: the keys
    to change with their values in this sweep."""
    shown = [f"{k}={'null' if params.get(k) is None else params.get(k)}" for k in keys]
    return "hydra.launcher." + " / ".join(shown)


def sbatch_error(stderr: str, params: Mapping[str, Any], partitions: Iterable[str] = ()) -> str:
    """One line (without ``error: ``) for an sbatch rejection: the key to change, Slurm's message."""
    lines = [ln.strip() for ln in str(stderr).splitlines() if ln.strip()]
    errors = [re.sub(r"^(sbatch: )?error: ", "", ln) for ln in lines if "error:" in ln]
    message = "; ".join(dict.fromkeys(errors or lines[-1:])) or "sbatch failed without a message"
    low = message.lower()
    keys = next((k for pattern, k in _SBATCH_KEYS if pattern in low), None)
    where = launcher_keys(keys, params) if keys else "the hydra.launcher.* settings"
    hint = f"; choose one of: {', '.join(partitions)}" if keys == ("partition",) and partitions else ""
    return f"{where}: Slurm refused the job array: {message}{hint}"


def stuck_reason(reason: str) -> tuple[str, ...] | None:
    """The launcher keys to change when ``reason`` (squeue's %r) can never resolve by waiting, else None."""
    base = reason.split(",")[0].strip()
    if base in STUCK_REASONS:
        return STUCK_REASONS[base]
    if re.fullmatch(r"(QOS|Assoc)Max\w*PerJob\w*", base):  # a per-job limit of the QOS or association
        return _PER_JOB_LIMIT
    return None


def partitions() -> list[str]:
    """The cluster's partitions (sinfo), for the hint of a bad partition; [] when sinfo fails."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({p.strip() for p in out.split() if p.strip()})


# ----------------------------------------------------------------------------- in the job
class TimeLimitReached(KeyboardInterrupt):
    """Raised inside a run when submitit will not requeue it any more (out of requeues): the run
    stops like on Ctrl-C, saving its finished tasks."""


#: what stopped this job process, set by :func:`job_signals`' handlers: None, "requeue", "timeout"
#: or "signal". Module state here, not in the plugin module: Hydra's plugin scan executes that
#: module a second time, and the requeued job's pickle would then carry a copy of it.
STOP: dict[str, Any] = {"why": None}


def job_signals() -> None:
    """In a Slurm job run by submitit: SIGUSR2 (``--signal=USR2@signal_delay_s``: time limit near,
    or preemption) goes to submitit's handler, which checkpoints the job callable and requeues it
    (``scontrol requeue`` + exit); when submitit refuses (out of requeues) the run is interrupted
    with :class:`TimeLimitReached` instead. SIGTERM (scancel, preemption, the time limit itself)
    interrupts the run (KeyboardInterrupt), unless a requeue is under way."""
    import signal

    import submitit
    from submitit.core.utils import UncompletedJobError

    usr = submitit.JobEnvironment._usr_sig()
    submitit_handler = signal.getsignal(usr)

    def on_usr(signum, frame):
        if STOP["why"]:
            return
        STOP["why"] = "requeue"
        try:
            if callable(submitit_handler):
                submitit_handler(signum, frame)  # checkpoint → scontrol requeue → SystemExit
            raise UncompletedJobError("not run by submitit's job environment")
        except UncompletedJobError as e:
            STOP.update(why="timeout", message=str(e))
            raise TimeLimitReached(str(e)) from None

    def on_term(signum, frame):
        if STOP["why"]:  # a requeue is under way (scontrol requeue signals the job too)
            return
        STOP["why"] = "signal"
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(usr, on_usr)
    signal.signal(signal.SIGTERM, on_term)


# ----------------------------------------------------------------------------- outcomes
def outcome(state: str | None, recorded: str | None) -> str | None:
    """The status to record for a job that ended with Slurm ``state`` (sacct, e.g. ``CANCELLED by 0``)
    while its metrics.json says ``recorded`` (None: no metrics.json). None: keep what the run wrote.

    ok / failed / diverged / cancelled / timeout are final. Cancelled (scancel, also while pending)
    and timeout (time limit, or out of requeues) win over ``interrupted`` and over no file; an
    ``interrupted`` run under any other state (preempted, signalled) stays resumable as it is; a job
    that ended without any metrics.json otherwise failed (crash, out of memory, node failure).
    """
    from cl_runner.schema import STATUSES

    if recorded in STATUSES and recorded not in (RELABELLED, "missing"):
        return None
    word = first_word(state)
    if word == "CANCELLED":
        return "cancelled"
    if word in ("TIMEOUT", "DEADLINE"):
        return "timeout"
    if recorded == "interrupted":
        return None
    return "failed"


def _checkpoint_progress(out_dir: Path):
    """Finished rows from the run's per-task checkpoint (read safely, as a resume reads it), for a
    job killed before it could write metrics.json; None when there is none or it cannot be read."""
    from cl_runner.record import Progress
    from cl_runner.runfiles import CheckpointError, checkpoint_path, load_checkpoint

    try:
        state = (load_checkpoint(checkpoint_path(out_dir), "cpu") or {}).get("trainer")
    except CheckpointError:
        return None
    if not state:
        return None
    return Progress(list(state["initial"]), [list(r) for r in state["matrix"]], [], state.get("steps"))


def record_outcome(out_dir: Path, cfg: Any, status: str, message: str) -> dict[str, Any]:
    """Write ``status`` (cancelled / timeout / failed) into ``out_dir/metrics.json`` through the run
    record (:mod:`cl_runner.record`): over an ``interrupted`` record it keeps the run's fields and
    finished rows; with none it records the identity fields (the folder is created for a job that never
    started), with the rows of ``checkpoint.pt`` when there is one."""
    from cl_runner import record, schema

    out_dir = Path(out_dir)
    previous = record.read(out_dir)
    if previous is not None and previous.get("status") != RELABELLED:
        return previous  # ok / failed / diverged / already labelled: never replaced
    if previous is not None:
        result = record.relabel(previous, status, message)
    else:
        try:
            experiment = cfg.hydra.runtime.choices.get("experiment")
        except Exception:  # noqa: BLE001 - a config without Hydra's node (tests)
            experiment = None
        progress = _checkpoint_progress(out_dir)
        result = record.build(status, schema.identity(cfg, experiment), error=message, progress=progress)
    record.write(out_dir, result)
    return result


def finished_tasks(out_dir: Path) -> int | None:
    """How many tasks the job finished and saved (metrics.json's tasks_done, else checkpoint.pt's)."""
    from cl_runner import record

    data = record.read(out_dir)
    if data is not None and data.get("tasks_done") is not None:
        return int(data["tasks_done"])
    progress = _checkpoint_progress(out_dir)
    return None if progress is None else len(progress.matrix)


def outcome_message(
    status: str,
    job_id: str,
    state: str | None,
    params: Mapping[str, Any],
    tasks_done: int | None,
    started: bool = True,
    log: str | None = None,
) -> str:
    """The ``error`` text of a status the launcher records."""
    kept = "no task had finished" if not tasks_done else f"{tasks_done} finished task(s) kept"
    if status == "cancelled":
        if not started:
            return f"Slurm job {job_id} was cancelled while pending; run the sweep's command again to run it"
        return (
            f"Slurm job {job_id} was cancelled while running ({state}); {kept}; run the sweep's command again to resume"
        )
    if status == "timeout":
        return (
            f"Slurm job {job_id} reached its time limit (hydra.launcher.timeout_min={params.get('timeout_min')}) and "
            f"may not be requeued again (hydra.launcher.max_num_timeout={params.get('max_num_timeout')}); {kept}; "
            "raise either, or run the sweep's command again to resume"
        )
    why = f"Slurm state {state}" if state else "unknown Slurm state"
    if first_word(state) == "OUT_OF_MEMORY":
        why += f" (raise hydra.launcher.mem_gb={params.get('mem_gb')})"
    return f"Slurm job {job_id} ended without results: {why}" + (f"; see {log}" if log else "")


def first_word(state: str | None) -> str:
    """ "CANCELLED by 0" → "CANCELLED"."""
    return (state or "").split(" ")[0].upper()


# ----------------------------------------------------------------------------- names, resources
def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: the characters a job name keeps; every other one becomes "_"
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._:=,+@-]")
NAME_LIMIT = 80


def safe_name(text: Any, limit: int = NAME_LIMIT) -> str:
    """``text`` as a Slurm job name: letters, digits and ``. _ : = , + @ -`` only (anything else, a
    space, quote, ``$``, a line break, becomes ``_``), at most ``limit`` characters (``...`` marks a
    cut). A job name is written into the job's sbatch script (``#SBATCH --job-name=…``: a line break
    in it would start a shell line of the script) and passed to ``scontrol update JobName=``."""
    return _short(_UNSAFE_NAME.sub("_", str(text)), limit) or "cl-run"


def job_name(overrides: Iterable[str], default_method: str | None = None, limit: int = NAME_LIMIT) -> str:
    """``cl-run:<method>:<other overrides>`` from a job's or a sweep's overrides, e.g.
    ``cl-run:ewc:lambda=100,seed=1``; hydra.* and path keys are left out; made safe and shortened to
    ``limit`` characters by :func:`safe_name` (override values are anything the command line holds)."""
    method, rest = default_method, []
    for o in overrides:
        key, _, value = str(o).lstrip("+~").partition("=")
        if key == "method":
            method = value
        elif not key.startswith("hydra") and key not in ("data_dir", "download", "device"):
            rest.append(f"{key}={value}")
    return safe_name(f"cl-run:{method or '?'}:{','.join(rest)}".rstrip(":"), limit)


#: launcher settings that are shell lines of the sbatch script by design (the user's own commands)
_SHELL_LINES = ("setup", "teardown")
#: launcher settings that never reach the script (cl-runner's own)
_NOT_IN_SCRIPT = ("poll_s", "_target_")


def script_problem(params: Mapping[str, Any]) -> str | None:
    """One line (without ``error: ``) naming the first launcher setting whose text would break out of
    its line of the sbatch script, else None. submitit writes each setting as ``#SBATCH --key=value``
    (``shlex.quote``: safe on one line, but a line break ends the comment and the rest of the value
    becomes a shell command) and ``submitit_folder`` (from ``hydra.sweep.dir``) as ``--output`` /
    ``--error``; ``additional_parameters`` adds one line per key. So every string in them, keys
    included, must be free of line breaks and other control characters; a path or a partition
    cannot be made safe by replacing characters, so it is refused rather than changed. ``setup`` and
    ``teardown`` are shell lines by design (the user's own config) and not checked; ``name`` is
    made safe by :func:`safe_name`."""
    for key, value in params.items():
        if key in _SHELL_LINES or key in _NOT_IN_SCRIPT:
            continue
        for where, text in _strings(str(key), value):
            bad = next((c for c in text if not c.isprintable()), None)
            if bad is not None:
                return (
                    f"hydra.launcher.{where} must not hold a line break or another control character "
                    f"({bad!r}: it would end its #SBATCH line in the job script), got {text!r}"
                )
    return None


def _strings(where: str, value: Any):
    """(key path, text) for every string in ``value``: mapping keys and values, list items."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield where, str(k)
            yield from _strings(f"{where}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _strings(f"{where}[{i}]", v)
    elif isinstance(value, str):
        yield where, value


#: GB per job by benchmark, from measured peaks on CPU (split_digits 0.9 GB, split_mnist 1.1 GB) with
#: room for the CUDA runtime; benchmarks holding one transformed copy per task (permuted, rotated)
#: or several datasets, and CIFAR, get more
MEM_GB = {
    "split_digits": 2,
    "permuted_digits": 2,
    "split_mnist": 4,
    "split_fashion_mnist": 4,
    "mnist_fashion": 4,
    "permuted_mnist": 8,
    "rotated_mnist": 8,
    "mnist_fellowship": 8,
    "split_cifar10": 8,
    "split_cifar100": 8,
}


def default_mem_gb(benchmarks: Iterable[str]) -> int:
    """Memory per job of a sweep: the largest need among its jobs' benchmarks (8 GB when unknown)."""
    return max((MEM_GB.get(str(b), 8) for b in benchmarks), default=8)
