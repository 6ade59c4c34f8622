"""A run folder's own files, made safe against crashes and against a second process.

- :func:`write_atomic`: temporary file in the same folder, flushed to disk, then renamed over the
  target, so a reader (or a crash, or a full disk) never leaves half a file under the final name.
- :class:`RunLock`: an exclusive ``flock`` on ``<run>/.lock`` for as long as a run writes there; the
  kernel releases it when the process ends, also on ``kill -9``, so a crashed run never blocks its
  own resume, while two live processes can never share a folder.
- :func:`save_checkpoint` / :func:`load_checkpoint`: the trainer's state after the last finished task
  (``checkpoint.pt``, written atomically; the one before it is kept as ``checkpoint.prev.pt``, the
  way back when the latest is damaged). A checkpoint holds tensors, numbers, strings, lists and dicts
  only and is read with ``torch.load(weights_only=True)``: a file that needs anything else (a pickle
  that would run code) is refused with one line, never executed (:class:`CheckpointError`).
- :func:`config_differences`: which keys of a saved run config differ from a new one (resume check).

No torch import at module level: the app checks folders before it imports torch.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
CONFIG = "config_resolved.yaml"
METRICS = "metrics.json"
LOCK = ".lock"
#: keys that say where data is read from, not what is computed: they may differ on resume
NOT_COMPARED = ("data_dir", "download", "resume")


class RunBusy(ValueError):
    """Another live process holds the run folder."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely (damaged, truncated, foreign, or a pickle that would
    run code); the message is one line."""


def write_atomic(path: str | Path, data: str | bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RunLock:
    """``with RunLock(folder):`` — exclusive use of a run folder (see module docstring)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunBusy(
                f"another cl-run (pid {holder}) is writing to {self.path.parent}; wait for it or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays (removing it would race a waiter)
            self.fd = None


def check_not_busy(folder: str | Path) -> None:
    """Raise :class:`RunBusy` if a live process holds ``folder`` (a no-op for a missing folder)."""
    if (Path(folder) / LOCK).exists():
        with RunLock(folder):
            pass


def save_checkpoint(folder: str | Path, state: Mapping[str, Any]) -> None:
    """``state`` to ``checkpoint.pt``, atomically; the checkpoint it replaces becomes
    ``checkpoint.prev.pt`` (a crash in between leaves the previous one, which resume then reads)."""
    import io

    import torch

    folder = Path(folder)
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    current = folder / CHECKPOINT
    tmp = folder / f".{CHECKPOINT}.new{os.getpid()}"
    write_atomic(tmp, buffer.getvalue())
    if current.is_file():
        os.replace(current, folder / PREVIOUS_CHECKPOINT)
    os.replace(tmp, current)


def remove_checkpoints(folder: str | Path) -> None:
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        (Path(folder) / name).unlink(missing_ok=True)


def checkpoint_path(folder: str | Path, previous: bool = False) -> Path | None:
    """The checkpoint a resume reads: ``checkpoint.pt`` (``previous``: ``checkpoint.prev.pt``); without
    ``checkpoint.pt``, the previous one (a crash between the two renames of :func:`save_checkpoint`)."""
    folder = Path(folder)
    names = (PREVIOUS_CHECKPOINT,) if previous else (CHECKPOINT, PREVIOUS_CHECKPOINT)
    return next((folder / n for n in names if (folder / n).is_file()), None)


def load_checkpoint(path: str | Path | None, device: Any = None) -> dict[str, Any] | None:
    """The state saved at ``path`` (None for no path), read with ``weights_only=True``: tensors, numbers,
    strings, lists and dicts only. :class:`CheckpointError` (one line) for anything else."""
    if path is None:
        return None
    import pickle

    import torch

    path = Path(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        why = (
            "it holds objects other than tensors, numbers, strings, lists and dicts (not loaded, nothing in it was run)"
        )
        raise CheckpointError(f"{path} cannot be read safely: {why}; {first[:200]}") from None
    except Exception as e:  # truncated, empty, not a torch file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path} is damaged or not a cl-runner checkpoint ({type(e).__name__}: {first[:200]})"
        ) from None
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("trainer"), dict)
        or "tasks_done" not in state["trainer"]
    ):
        raise CheckpointError(f"{path} is not a cl-runner checkpoint (no trainer state in it)")
    return state


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key (old → new)`` for every key whose value differs, ignoring :data:`NOT_COMPARED`."""
    a, b = flatten(saved), flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in NOT_COMPARED:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key} ({a.get(key, '<absent>')} → {b.get(key, '<absent>')})")
    return diffs
