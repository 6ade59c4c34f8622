"""The memory a task stream will take, known before anything is read (:func:`estimate_bytes`: every
storage the stream is built from, at its peak), and the check against the memory available on the
device (:func:`check_memory`: MemAvailable on the CPU, free memory on a GPU)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from cl_runner.data import arrays
from cl_runner.data.datasets import INFO
from cl_runner.data.declarations import _padded, _source, _split_plan, benchmark_options, show


def _sizes(opts: Mapping[str, Any]) -> list[tuple[int, int, tuple[int, ...]]] | None:
    """(n_train, n_test, sample shape) per source without reading data; None for a dataset class."""
    out = []
    for how, what in _source(opts):
        if how == "name":
            info = INFO[what]
            out.append((info.n_train, info.n_test, info.shape))
        elif how == "path":
            entries = arrays.header(what)
            out.append((*arrays.sizes(entries), arrays.sample_shape(entries)))
        else:
            return None
    return out


def _copies(opts: Mapping[str, Any], sizes: list, n_train: int, n_test: int) -> tuple:
    """(tasks, copies of the whole data the kind makes, training and test samples per task, what the
    message calls it, the key to change) for each kind."""
    kind, pad, n_all = opts["kind"], opts["pad"], n_train + n_test
    if kind == "split":
        how, name = _source(opts)[0]
        classes = INFO[name].n_classes if how == "name" else None  # a file's classes: all of it, at most
        plan = _split_plan(opts, list(range(classes)), name) if classes else None
        share = plan[1] * plan[2] / classes if plan else 1.0
        n_tasks = plan[1] if plan else 1
        what = f"{n_tasks} task{'s' if n_tasks > 1 else ''} cut from {n_all} samples"
        key = "benchmark.pad" if pad else ("benchmark.path" if opts.get("path") else "benchmark.dataset")
        return n_tasks, share, share * n_train / n_tasks, share * n_test / n_tasks, what, key
    if kind == "permuted":
        n_tasks = opts["n_tasks"]
        copies = n_tasks - (0 if opts["permute_first"] else 1)
        return n_tasks, copies, n_train, n_test, f"{n_tasks} tasks of {n_all} samples", "benchmark.n_tasks"
    if kind == "rotated":
        random = opts["angles"] == "random"
        n_tasks = opts["n_tasks"] if random else len(opts["angles"])
        copies = n_tasks if random else sum(1 for a in opts["angles"] if float(a) % 360 != 0)
        key = "benchmark.n_tasks" if random else "benchmark.angles"
        return n_tasks, copies, n_train, n_test, f"{n_tasks} tasks of {n_all} samples", key
    n_tasks = len(sizes)
    per = max(n_tasks, 1)
    return n_tasks, 0, n_train / per, n_test / per, f"{n_tasks} datasets of {n_all} samples", "benchmark.datasets"


def _bytes_of(opts: Mapping[str, Any], sizes: list[tuple[int, int, tuple[int, ...]]]) -> dict[str, Any]:
    """The stream's memory, as built by :func:`build_stream`: float32 inputs and int64 labels of
    the loaded data, their padded copy, the copies the kind makes (split: the tasks' share of the
    data; permuted / rotated: the whole data per transformed task; sequence: none), a copy of every
    task that is subset or normalized, and the tasks' labels. Every one of these is counted although
    the read and padded copies are freed on the way: an upper bound of the peak."""
    kind, pad = opts["kind"], opts["pad"]
    loaded = padded = 0
    per_sample = 0
    n_train = n_test = 0
    for ntr, nte, shape in sizes:
        n = ntr + nte
        loaded += n * (4 * math.prod(shape) + 8)
        after = _padded(shape, pad)
        per_sample = 4 * math.prod(after)
        if after != tuple(shape):
            padded += n * per_sample
        n_train, n_test = n_train + ntr, n_test + nte
    n_all = n_train + n_test
    n_tasks, copies, task_train, task_test, what, key = _copies(opts, sizes, n_train, n_test)
    parts = copies * n_all * (per_sample + (8 if kind == "split" else 0))
    # each task: a subset is a copy, normalizing makes one more (the subset's is freed), labels are new
    norm, tasks = opts["normalize"] is not None, 0.0
    for n, limit in ((task_train, opts["max_train_per_task"]), (task_test, opts["max_test_per_task"])):
        kept = min(n, limit) if limit else n
        copied = norm or (limit is not None and limit < n)
        tasks += n_tasks * kept * ((per_sample if copied else 0) + 8)
    total = int(loaded + padded + parts + tasks)
    shape = "×".join(map(str, _padded(sizes[-1][2], pad)))
    return {
        "total": total,
        "loaded": int(loaded),
        "key": key,
        "what": f"{what} of {shape} float32",
    }


def estimate_bytes(cfg: Any) -> int | None:
    """The memory the task stream will take (an upper bound of the peak while it is built), from the
    registered datasets' sizes and shapes or a file's header; None when it cannot be known without
    reading the data (a ``dataset._target_`` class: :func:`build_stream` checks it once read)."""
    opts = benchmark_options(cfg)
    sizes = _sizes(opts)
    return None if sizes is None else _bytes_of(opts, sizes)["total"]


def available_memory(device: torch.device | str) -> tuple[int, str] | None:
    """(bytes available, where) on the device: the CPU's MemAvailable (/proc/meminfo), a CUDA
    device's free memory; None when it cannot be told (then nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except Exception:
            return None
        return int(free), f"{device} (free memory)"
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "the machine (MemAvailable)"
    except (OSError, ValueError, IndexError):
        return None
    return None


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.3g} PB"  # pragma: no cover


def _check_fits(opts: Mapping[str, Any], sizes: list, device: torch.device, available: Any = None) -> None:
    need = _bytes_of(opts, sizes)
    places = [(need["total"], device)]
    if device.type != "cpu":  # the data are read on the CPU first
        places.append((need["loaded"], torch.device("cpu")))
    for amount, where in places:
        avail = available(where) if callable(available) else available_memory(where)
        if avail is None:
            continue
        free, place = avail
        if amount > free:
            key = need["key"]
            value = opts.get(key.split(".", 1)[1])
            shown = f"[{len(value)} values]" if isinstance(value, list) and len(value) > 8 else show(value)
            raise ValueError(
                f"{key}={shown}: the task stream needs {_human(amount)} ({need['what']}) but {place} has "
                f"{_human(free)} available; use fewer or smaller tasks (benchmark.max_train_per_task, "
                "benchmark.n_tasks) or another device"
            )


def check_memory(cfg: Any, device: torch.device | str, available: Callable[..., Any] | None = None) -> None:
    """ValueError naming the option that drives it if the task stream (:func:`estimate_bytes`) cannot
    fit in the device's available memory (:func:`available_memory`; ``available`` replaces it, for
    tests); before anything is read or allocated. A dataset class's stream is checked once read."""
    opts = benchmark_options(cfg)
    sizes = _sizes(opts)
    if sizes is not None:
        _check_fits(opts, sizes, torch.device(device), available)


# ----------------------------------------------------------------------------- reading
