"""The folders a command writes into, checked before Hydra makes any: a run folder or a sweep folder
must be a usable name, creatable, and either new, empty, or cl-run's own (resumable by the same
config or sweep, not finished, not in use, with a checkpoint that can be read safely); a Slurm
launcher's settings must not break out of their lines of the job script. A refusal is
:class:`UsageError`, one line."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cl_runner import record
from cl_runner.identity import read_saved, select_saved
from cl_runner.runfiles import CONFIG, CheckpointError, check_not_busy


class UsageError(Exception):
    """Bad input on the command line: cl-run prints ``error: <message>`` and exits 2."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_folder(key: str, folder: str | Path) -> None:
    """A run or sweep folder must be a usable name and creatable: probe its nearest existing parent
    (nothing is left behind)."""
    if not str(folder).strip():
        raise UsageError(f"{key} is empty; give a folder (or leave {key} out for the default)")
    folder = Path(folder)
    limit = 255  # NAME_MAX of the common file systems (ext4, xfs, btrfs, tmpfs)
    long = next((p for p in folder.parts if len(os.fsencode(p)) > limit), None)
    if long is not None:
        raise UsageError(f"{key}={folder}: the name {long[:40]}… has more than {limit} bytes; choose a shorter one")
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


def _ours(folder: Path) -> bool:
    """A folder cl-run may write into: one holding a cl-run run (its config, or Hydra's record of the
    job), or nothing but hidden files (a lock, a temporary file)."""
    entries = [p.name for p in folder.iterdir()]
    return CONFIG in entries or ".hydra" in entries or all(name.startswith(".") for name in entries)


def check_run_dir(folder: Path, cfg: DictConfig) -> None:
    """An explicit hydra.run.dir: ours (or empty), not in use, not finished, made by the same config
    (to resume), and with a checkpoint that can be read."""
    from cl_runner.run import check_same_config, resume_checkpoint

    if not folder.exists():
        return
    if not folder.is_dir() or not _ours(folder):
        raise UsageError(f"hydra.run.dir={folder} holds files that are not a cl-run run; choose an empty or new folder")
    try:
        check_not_busy(folder)
    except ValueError as e:
        raise UsageError(str(e)) from None
    status = record.read(folder)
    if record.is_final(status):
        raise UsageError(
            f"hydra.run.dir={folder} already holds finished results (status {status.get('status')}); "
            "choose another folder"
        )
    try:
        if (folder / CONFIG).is_file():
            check_same_config(folder, cfg)
        resume_checkpoint(folder, cfg.get("resume", "auto"))
    except (ValueError, CheckpointError) as e:
        raise UsageError(_one_line(e)) from None


def check_sweep_dir(folder: Path, overrides: list[str]) -> None:
    """An explicit hydra.sweep.dir that holds a sweep can only be resumed by the same sweep; any other
    non-empty folder is refused."""
    if not folder.exists():
        return
    saved = folder / "multirun.yaml"
    if saved.is_file():
        before = select_saved(read_saved(saved), "hydra.overrides.task") or []  # read, never resolved
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
    if folder.is_dir() and any(folder.iterdir()):
        raise UsageError(f"hydra.sweep.dir={folder} holds files that are not a cl-run sweep; choose another folder")


def check_launcher(cfg: DictConfig) -> None:
    """Slurm launchers: no setting may break out of its line of the job script (checked here, before
    the sweep's folder exists)."""
    launcher = OmegaConf.select(cfg, "hydra.launcher")
    if launcher is None or "slurm" not in str(launcher.get("_target_", "")).lower():
        return
    from cl_runner.slurm import script_problem

    try:
        params = OmegaConf.to_container(launcher, resolve=True)
    except Exception as e:  # noqa: BLE001 - an interpolation that does not resolve
        raise UsageError(f"hydra.launcher: {_one_line(e)}") from None
    problem = script_problem(params)
    if problem:
        raise UsageError(problem)
