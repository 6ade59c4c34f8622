"""A run folder's own files, made safe against crashes and against a second process.

- :func:`write_atomic`: temporary file in the same folder, flushed to disk, then renamed over the
  target, so a reader (or a crash, or a full disk) never leaves half a file under the final name.
- :class:`RunLock`: an exclusive ``flock`` on ``<run>/.lock`` for as long as a run writes there; the
  kernel releases it when the process ends, also on ``kill -9``, so a crashed run never blocks its
  own resume, while two live processes can never share a folder.
- :func:`save_checkpoint` / :func:`load_checkpoint`: the trainer's state after the last finished task
  (``checkpoint.pt``, written atomically, only the latest kept).
- :func:`config_differences`: which keys of a saved run config differ from a new one (resume check).

No torch import at module level: the app checks folders before it imports torch.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CHECKPOINT = "checkpoint.pt"
CONFIG = "config_resolved.yaml"
METRICS = "metrics.json"
LOCK = ".lock"
#: keys that say where data is read from, not what is computed: they may differ on resume
NOT_COMPARED = ("data_dir", "download")


class RunBusy(ValueError):
    """Another live process holds the run folder."""


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


def read_status(folder: str | Path) -> dict[str, Any] | None:
    """The run's ``metrics.json`` (a dict), or None when there is none or it cannot be read."""
    try:
        data = json.loads((Path(folder) / METRICS).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_checkpoint(folder: str | Path, state: Mapping[str, Any]) -> None:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    write_atomic(Path(folder) / CHECKPOINT, buffer.getvalue())


def load_checkpoint(folder: str | Path, device: Any = None) -> dict[str, Any] | None:
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        return None
    import torch

    # our own file (method state holds plain Python objects): not weights-only
    return torch.load(path, map_location=device, weights_only=False)


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
