"""The user's own data: an ``.npz`` or ``.pt`` file of arrays (``benchmark.path``).

The file holds ``x_train, y_train, x_test, y_test`` and, optionally, ``t_train, t_test`` (task ids
0..T-1, both or neither); other keys are not read. Inputs may be images ``(N, C, H, W)`` or
``(N, H, W)`` (one channel) or feature vectors ``(N, D)``; ``uint8`` inputs are scaled to [0, 1]
(as the built-in image datasets), every other numeric type is taken as it is (as float32). Labels are
integers >= 0; every test label must occur in the training labels (of its task, with task ids).

Nothing in a data file may run code: ``.npz`` is read with ``allow_pickle=False`` and ``.pt`` with
``torch.load(weights_only=True)`` (tensors in a dict: ``torch.save({"x_train": x, ...}, path)``).
A file that does not meet this is refused with one line, ``benchmark.path=<file>: <key> <what is
wrong>`` (:class:`DataFileError`), never read in part or fixed silently.

:func:`header` reads only what the shapes need (the ``.npy`` headers inside the ``.npz`` zip; a
``.pt`` file memory-mapped, so no tensor data is read), so the model's fit and the task stream's
memory are checked before a run starts; :func:`load` reads the whole file once.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cl_runner.data.datasets import RawDataset

REQUIRED = ("x_train", "y_train", "x_test", "y_test")
TASK_IDS = ("t_train", "t_test")
SUFFIXES = (".npz", ".pt", ".pth")
#: labels are mapped to output units through a table of max(label) + 1 entries
MAX_LABEL = 99_999
MAX_TASK_IDS = 10_000


class DataFileError(ValueError):
    """A data file that cannot be used; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Entry:
    """One array of the file as its header describes it."""

    shape: tuple[int, ...]
    dtype: str  # numpy's or torch's name: 'uint8', 'float32', 'torch.float32', ...
    kind: str  # 'f' float, 'i' signed int, 'u' unsigned int, 'b' bool, 'c' complex, 'O' anything else


def _where(path: str) -> str:
    return f"benchmark.path={path}"


def _fail(path: str, what: str) -> DataFileError:
    return DataFileError(f"{_where(path)}: {what}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def resolve(path: str) -> str:
    """The file's absolute path (``~`` expanded); DataFileError if it is not a readable file."""
    full = os.path.abspath(os.path.expanduser(str(path)))
    if not full.lower().endswith(SUFFIXES):
        raise _fail(path, "must be an .npz file (numpy.savez) or a .pt file (torch.save of a dict of tensors)")
    if not os.path.exists(full):
        raise _fail(path, f"no such file ({full})")
    if not os.path.isfile(full):
        raise _fail(path, f"not a file ({full})")
    if not os.access(full, os.R_OK):
        raise _fail(path, f"cannot read {full}: permission denied")
    return full


# ----------------------------------------------------------------------------- headers
def _numpy_kind(dtype: np.dtype) -> str:
    return dtype.kind if dtype.kind in "fiubc" else "O"


def _torch_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "b"
    if dtype.is_complex:
        return "c"
    if dtype.is_floating_point:
        return "f"
    return "u" if dtype == torch.uint8 else "i"


def _npz_header(path: str) -> dict[str, Entry]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise _fail(path, "not an .npz file (not a zip archive; write it with numpy.savez)") from None
    except OSError as e:
        raise _fail(path, f"cannot read it: {(e.strerror or _first_line(e)).lower()}") from None
    out = {}
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            try:
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(f)
            except Exception as e:  # a damaged member: bad magic, bad header, CRC/zlib errors
                raise _fail(path, f"key '{key}' is damaged ({_first_line(e)})") from None
            out[key] = Entry(tuple(int(d) for d in shape), str(dtype), _numpy_kind(dtype))
    return out


def _torch_load(path: str, mmap: bool) -> Any:
    if not zipfile.is_zipfile(path):  # torch.save's format since 1.6; before, a pickle stream
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":
                raise _fail(path, "not a file written by torch.save (neither its zip format nor a pickle)")
        mmap = False
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap" in str(e) and "_use_new_zipfile_serialization" in str(e):
            return _torch_load(path, mmap=False)
        raise _fail(path, f"not a file written by torch.save ({_first_line(e)})") from None
    except OSError as e:
        raise _fail(path, f"cannot read it: {(e.strerror or _first_line(e)).lower()}") from None
    except Exception as e:  # pickle.UnpicklingError: weights_only refused an object; EOFError: truncated
        text = str(e)
        found = re.search(r"GLOBAL (\S+)", text)
        if found:
            raise _fail(
                path,
                f"holds a {found.group(1)} object, which torch.load(weights_only=True) refuses (nothing in a data "
                "file may run code); save a dict of tensors: torch.save({'x_train': torch.as_tensor(x), ...}, path)",
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        reason = detail.group(1).strip() if detail else _first_line(e)
        raise _fail(path, f"not a file written by torch.save, or damaged ({type(e).__name__}: {reason})") from None


def _pt_tensors(path: str, mmap: bool) -> dict[str, torch.Tensor]:
    obj = _torch_load(path, mmap)
    if not isinstance(obj, Mapping):
        raise _fail(path, f"holds a {type(obj).__name__}, not a dict of tensors with keys {', '.join(REQUIRED)}")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            continue
        if key in REQUIRED + TASK_IDS and not isinstance(value, torch.Tensor):
            raise _fail(path, f"key '{key}' holds a {type(value).__name__}, not a tensor")
        if isinstance(value, torch.Tensor):
            out[key] = value
    return out


def header(path: str) -> dict[str, Entry]:
    """The shape and type of every array in the file, without reading the arrays' data; the
    structure is checked (:func:`check_header`)."""
    full = resolve(path)
    if full.lower().endswith(".npz"):
        entries = _npz_header(full)
    else:
        entries = {
            k: Entry(tuple(v.shape), str(v.dtype), _torch_kind(v.dtype)) for k, v in _pt_tensors(full, True).items()
        }
    check_header(path, entries)
    return entries


def _check_split(path: str, entries: Mapping[str, Entry], split: str) -> None:
    """One split's inputs (numbers, 2 to 4 dimensions, not empty) and its labels / task ids (integers,
    one per sample)."""
    x = entries[f"x_{split}"]
    if x.kind not in "fiu":
        raise _fail(path, f"key 'x_{split}' holds {x.dtype} values; inputs must be numbers (float or integer)")
    if not 2 <= len(x.shape) <= 4:
        raise _fail(
            path,
            f"key 'x_{split}' has shape {x.shape}; inputs must be (N, C, H, W) or (N, H, W) images or (N, D) features",
        )
    if x.shape[0] == 0:
        raise _fail(path, f"key 'x_{split}' is empty (0 samples)")
    if 0 in x.shape:
        raise _fail(path, f"key 'x_{split}' has shape {x.shape}: a sample with no values")
    for key in (f"y_{split}", f"t_{split}"):
        e = entries.get(key)
        if e is None:
            continue
        if e.kind not in "iu":
            raise _fail(path, f"key '{key}' holds {e.dtype} values; {_what(key)} must be integers")
        if len(e.shape) != 1 or e.shape[0] != x.shape[0]:
            raise _fail(path, f"key '{key}' has shape {e.shape} but x_{split} has {x.shape[0]} samples: shape mismatch")


def check_header(path: str, entries: Mapping[str, Entry]) -> None:
    """Keys present, dimensions, types and lengths agree; DataFileError naming the key otherwise."""
    missing = [k for k in REQUIRED if k not in entries]
    if missing:
        held = ", ".join(sorted(entries)) or "no arrays"
        raise _fail(
            path,
            f"key '{missing[0]}' is missing (the file holds: {held}; needed: {', '.join(REQUIRED)}; "
            f"optional: {', '.join(TASK_IDS)})",
        )
    has = [k for k in TASK_IDS if k in entries]
    if len(has) == 1:
        other = TASK_IDS[1 - TASK_IDS.index(has[0])]
        raise _fail(path, f"key '{other}' is missing: task ids come as both {' and '.join(TASK_IDS)}, or neither")
    for split in ("train", "test"):
        _check_split(path, entries, split)
    if entries["x_train"].shape[1:] != entries["x_test"].shape[1:]:
        raise _fail(
            path,
            f"key 'x_test' has samples of shape {entries['x_test'].shape[1:]} but x_train "
            f"{entries['x_train'].shape[1:]}: shape mismatch",
        )


def _what(key: str) -> str:
    return "labels" if key.startswith("y") else "task ids"


def sample_shape(entries: Mapping[str, Entry]) -> tuple[int, ...]:
    """One sample's shape as the task stream holds it: (C, H, W) for images, (D,) for features."""
    shape = entries["x_train"].shape[1:]
    return (1, *shape) if len(shape) == 2 else tuple(shape)


def sizes(entries: Mapping[str, Entry]) -> tuple[int, int]:
    return entries["x_train"].shape[0], entries["x_test"].shape[0]


# ----------------------------------------------------------------------------- reading
def _read_npz(path: str, keys: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    try:
        with np.load(path, allow_pickle=False) as f:
            for key in keys:
                try:
                    out[key] = torch.from_numpy(np.ascontiguousarray(f[key]))
                except ValueError as e:  # object arrays with allow_pickle=False
                    raise _fail(path, f"key '{key}' cannot be read without unpickling ({_first_line(e)})") from None
                except DataFileError:
                    raise
                except Exception as e:  # truncated or damaged compressed data
                    raise _fail(path, f"key '{key}' is damaged ({type(e).__name__}: {_first_line(e)})") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise _fail(path, f"cannot be read ({type(e).__name__}: {_first_line(e)})") from None
    return out


def _inputs(path: str, key: str, x: torch.Tensor) -> torch.Tensor:
    """float32 samples ((N, C, H, W) or (N, D)); uint8 scaled to [0, 1]; non-finite values refused."""
    x = x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)
    bad = ~torch.isfinite(x)
    if bad.any():
        n = int(bad.reshape(len(x), -1).any(1).sum())
        raise _fail(
            path,
            f"key '{key}' holds non-finite values (nan, inf, or beyond float32's range) in {n} of {len(x)} samples",
        )
    return (x.unsqueeze(1) if x.dim() == 3 else x).contiguous()


def _integers(path: str, key: str, v: torch.Tensor, hi: int) -> torch.Tensor:
    v = v.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > hi):
        bad = v[(v < 0) | (v > hi)]
        values = ", ".join(str(b) for b in sorted(set(bad[:1000].tolist()))[:5])
        raise _fail(path, f"key '{key}' holds {_what(key)} out of range (0..{hi}): {values}")
    return v


def _ids(path: str, t_train: torch.Tensor, t_test: torch.Tensor) -> int:
    """The number of tasks T; the ids must be exactly 0..T-1 in training and every task must be tested."""
    train, test = set(t_train.unique().tolist()), set(t_test.unique().tolist())
    n = int(max(train)) + 1
    gaps = sorted(set(range(n)) - train)
    if gaps:
        raise _fail(path, f"key 't_train' has no task {gaps[0]} but ids up to {n - 1}: task ids must be 0..T-1")
    if test - train:
        raise _fail(
            path, f"key 't_test' holds task ids that t_train does not: {sorted(test - train)[:5]} (ids 0..{n - 1})"
        )
    if train - test:
        raise _fail(path, f"key 't_test' has no samples of task {sorted(train - test)[0]}: every task needs test data")
    return n


def _labels_trained(path: str, y_train: torch.Tensor, y_test: torch.Tensor, task: int | None = None) -> None:
    extra = sorted(set(y_test.unique().tolist()) - set(y_train.unique().tolist()))
    if extra:
        where = f" of task {task}" if task is not None else ""
        raise _fail(
            path,
            f"key 'y_test' holds labels{where} that y_train{where} does not: {', '.join(map(str, extra[:5]))} "
            "(a class must be trained to be tested)",
        )


def load(path: str) -> RawDataset:
    """The whole file as a :class:`RawDataset` (CPU tensors), checked; DataFileError otherwise."""
    entries = header(path)
    full = resolve(path)
    keys = [k for k in REQUIRED + TASK_IDS if k in entries]
    arrays = _read_npz(full, keys) if full.lower().endswith(".npz") else _pt_tensors(full, False)
    x_train, x_test = _inputs(path, "x_train", arrays["x_train"]), _inputs(path, "x_test", arrays["x_test"])
    y_train = _integers(path, "y_train", arrays["y_train"], MAX_LABEL)
    y_test = _integers(path, "y_test", arrays["y_test"], MAX_LABEL)
    t_train = t_test = None
    if "t_train" in arrays:
        t_train = _integers(path, "t_train", arrays["t_train"], MAX_TASK_IDS - 1)
        t_test = _integers(path, "t_test", arrays["t_test"], MAX_TASK_IDS - 1)
        for t in range(_ids(path, t_train, t_test)):
            _labels_trained(path, y_train[t_train == t], y_test[t_test == t], t)
    else:
        _labels_trained(path, y_train, y_test)
    name = os.path.splitext(os.path.basename(full))[0]
    n_classes = int(y_train.max()) + 1
    return RawDataset(name, x_train, y_train, x_test, y_test, n_classes, t_train, t_test, source=full)
