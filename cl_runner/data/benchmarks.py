"""Build a :class:`TaskStream` from a ``benchmark`` config: load the dataset(s) once, move them to
the device, apply the task transforms as tensor operations, and assign output units per scenario.

Benchmark kinds (``benchmark.kind``), each a builder registered in ``KINDS`` with the options it
reads (``@register_kind("name", options={key: (spec, default)})``) that turns the loaded data into
the stream's tasks (a :class:`Part` each):

- ``split``:    the data cut into tasks by class (``n_tasks`` × ``classes_per_task``; fixed
                ``class_order`` or, with ``shuffle_classes``, an order drawn from the seed), or, for
                data that come with task ids (``t_train``/``t_test`` in a file), one task per id;
- ``permuted``: ``n_tasks`` fixed pixel permutations of the whole data drawn from the seed
                (``permute_first: false`` keeps task 1 unpermuted);
- ``rotated``:  one task per angle in ``angles`` (degrees);
- ``sequence``: one task per dataset in ``datasets`` (e.g. MNIST then Fashion-MNIST).

Where the data come from (split, permuted, rotated): ``dataset``, a registered name (``mnist``, …,
:mod:`cl_runner.data.datasets`) or ``{_target_: <a dataset class>, <its arguments>}`` (e.g.
``torchvision.datasets.EMNIST``, read once into tensors: :mod:`cl_runner.data.vision`), or ``path``,
the user's own ``.npz``/``.pt`` file of arrays (:mod:`cl_runner.data.arrays`); one of the two.

Options of every kind (:data:`COMMON`): ``name``, ``kind``, ``scenarios`` (the scenarios that make
sense for the benchmark; others are refused), ``pad`` (zero-pad to a square size, centred),
``normalize`` (null, ``auto`` = the padded training set's per-channel statistics, or ``{mean: …,
std: …}``), ``max_train_per_task`` / ``max_test_per_task`` (a seeded subset; for quick tests).
Order of operations: pad → task transform (permutation / rotation) → normalize.

Every option is declared once, with its type, range and default (:mod:`cl_runner.options` specs);
:func:`check_benchmark` checks every key of the node against its kind's declarations and what the
registered datasets are known to hold (image shape, classes), without reading any file, so that a
bad value is refused in one line naming ``benchmark.<key>`` before a run folder is made.
:func:`input_shape` (the model's input), :func:`estimate_bytes` / :func:`check_memory` (the task
stream against the memory available) and :func:`check_data` (every data file read and checked,
kept for the run) are the other checks a run can make before it starts.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cl_runner.data import arrays, vision
from cl_runner.data import transforms as T
from cl_runner.data.datasets import INFO, LOADERS, RawDataset, load_dataset
from cl_runner.data.stream import SCENARIOS, Task, TaskStream, assign_units, label_to_unit
from cl_runner.options import (
    AnyOf,
    Anything,
    Bool,
    Choice,
    Fields,
    Float,
    Int,
    ListOf,
    OptionError,
    Spec,
    unknown_key,
)

#: bounds that keep a typo from asking for all of the machine's memory (the memory check then sees the rest)
MAX_TASKS = 10_000
MAX_CLASSES = arrays.MAX_LABEL + 1
MAX_PAD = 4096
MAX_PER_TASK = 2**31 - 1
#: classes per task when neither n_tasks nor classes_per_task is given (every split_* benchmark's)
DEFAULT_CLASSES_PER_TASK = 2


@dataclass
class Part:
    """One task before normalization, subsetting and unit assignment."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: list[int]


Builder = Callable[[Mapping[str, Any], list[RawDataset], torch.Generator], list[Part]]
Option = tuple[Spec, Any]  # (declaration, default)
KINDS: dict[str, Builder] = {}
#: the options each kind reads besides :data:`COMMON`, with their defaults
KIND_OPTIONS: dict[str, dict[str, Option]] = {}


def register_kind(name: str, options: Mapping[str, Option] | None = None) -> Callable[[Builder], Builder]:
    """Register a builder under ``benchmark.kind=name`` with the options it reads (besides
    :data:`COMMON`): ``{key: (spec, default)}``. A key the kind does not declare is refused."""

    def register(fn: Builder) -> Builder:
        KINDS[name] = fn
        KIND_OPTIONS[name] = dict(options or {})
        return fn

    return register


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


# ----------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Name(Spec):
    """A benchmark's name (it goes into run folder names and summaries)."""

    def _check(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}", value):
            raise self.error(key, value)
        return value

    def _what(self) -> str:
        return "a name of letters, digits and _ . + - (at most 100 characters)"


@dataclass(frozen=True)
class Described(ListOf):
    """A list whose items are described in words (``what``) rather than from their spec."""

    described: str = ""

    def _what(self) -> str:
        return self.described or super()._what()


@dataclass(frozen=True)
class DatasetName(Spec):
    """The name of a registered dataset (checked against the registry when the value is checked)."""

    def _check(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in LOADERS:
            raise OptionError(key, f"{key}={_show(value)} is not valid; choose one of: {', '.join(sorted(LOADERS))}")
        return value

    def _what(self) -> str:
        return "one of: " + ", ".join(sorted(LOADERS))


@dataclass(frozen=True)
class DatasetNames(ListOf):
    """A list of registered datasets' names (the sequence kind's ``datasets``)."""

    item: Spec = DatasetName()

    def _what(self) -> str:
        return f"a list of dataset names from: {', '.join(sorted(LOADERS))}"


@dataclass(frozen=True)
class Dataset(Spec):
    """A registered dataset's name, or ``{_target_: <a dataset class>, <its constructor arguments>}``."""

    def _check(self, key: str, value: Any) -> Any:
        if isinstance(value, Mapping):
            if "_target_" not in value:
                raise self.error(key, dict(value))
            return dict(value)
        if not isinstance(value, str) or value not in LOADERS:
            raise OptionError(
                key,
                f"{key}={_show(value)} is not valid; choose one of: {', '.join(sorted(LOADERS))} "
                "(or {_target_: <a dataset class>, <its arguments>})",
            )
        return value

    def _what(self) -> str:
        return f"one of {', '.join(sorted(LOADERS))} or {{_target_: <a dataset class>, <its arguments>}}"


@dataclass(frozen=True)
class DataPath(Spec):
    def _check(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip() or not value.lower().endswith(arrays.SUFFIXES):
            raise self.error(key, value)
        return value

    def _what(self) -> str:
        return "the path of an .npz file (numpy.savez) or a .pt file (torch.save of a dict of tensors)"


NORMALIZE_FIELDS = Fields(
    fields=(
        ("mean", AnyOf(alternatives=(Float(), Described(item=Float(), described="a list of one per channel")))),
        (
            "std",
            AnyOf(
                alternatives=(
                    Float(lo=0, lo_open=True),
                    Described(item=Float(lo=0, lo_open=True), described="a list of one per channel (each > 0)"),
                )
            ),
        ),
    )
)


@dataclass(frozen=True)
class Normalize(Spec):
    """``auto`` or ``{mean, std}`` (std > 0; one value or one per channel)."""

    def _check(self, key: str, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, Mapping):
            return NORMALIZE_FIELDS.check(key, value)
        raise self.error(key, value)

    def _what(self) -> str:
        return "auto or {mean: a number or one per channel, std: a number > 0 or one per channel}"


def _per_task(what: str) -> Int:
    return Int(lo=1, hi=MAX_PER_TASK, optional=True, null_means=f"all the {what} samples")


#: the options every kind has, with their defaults
COMMON: dict[str, Option] = {
    "name": (Name(optional=True, null_means="the kind's name"), None),
    "kind": (Anything(), "split"),  # checked first, against KINDS
    "scenarios": (
        Described(
            item=Choice(choices=SCENARIOS),
            unique=True,
            max_len=len(SCENARIOS),
            optional=True,
            null_means="all three",
            described=f"a list of scenarios from: {', '.join(SCENARIOS)}",
        ),
        None,
    ),
    "pad": (Int(lo=0, hi=MAX_PAD), 0),
    "normalize": (Normalize(optional=True, null_means="none"), None),
    "max_train_per_task": (_per_task("training"), None),
    "max_test_per_task": (_per_task("test"), None),
}
#: where a single-dataset kind's data come from: one of the two
SOURCE: dict[str, Option] = {
    "dataset": (Dataset(optional=True, null_means="benchmark.path's file"), None),
    "path": (DataPath(optional=True, null_means="benchmark.dataset"), None),
}
SPLIT_OPTIONS: dict[str, Option] = {
    **SOURCE,
    "n_tasks": (Int(lo=1, hi=MAX_TASKS, optional=True, null_means="the classes / classes_per_task"), None),
    "classes_per_task": (
        Int(lo=1, hi=MAX_CLASSES, optional=True, null_means=f"the classes / n_tasks, or {DEFAULT_CLASSES_PER_TASK}"),
        None,
    ),
    "class_order": (
        Described(
            item=Int(lo=0, hi=MAX_CLASSES - 1),
            unique=True,
            max_len=MAX_CLASSES,
            optional=True,
            null_means="the dataset's classes in increasing order",
            described="a list of class ids (integers >= 0, each once)",
        ),
        None,
    ),
    "shuffle_classes": (Bool(), False),
}
PERMUTED_OPTIONS: dict[str, Option] = {
    **SOURCE,
    "n_tasks": (Int(lo=1, hi=MAX_TASKS), 10),
    "permute_first": (Bool(), True),
}
ROTATED_OPTIONS: dict[str, Option] = {
    **SOURCE,
    "angles": (
        Described(
            item=Float(lo=-360, hi=360),
            max_len=MAX_TASKS,
            described="a list of angles in degrees, each in [-360, 360]",
        ),
        [0, 20, 40, 60, 80],
    ),
}
SEQUENCE_OPTIONS: dict[str, Option] = {
    "datasets": (DatasetNames(max_len=MAX_TASKS), None),
}


def declared_options(kind: str) -> dict[str, Option]:
    """Every option of a kind: :data:`COMMON` and its own, ``{key: (spec, default)}``."""
    return {**COMMON, **KIND_OPTIONS[kind]}


def _plain(cfg: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    if not isinstance(cfg, Mapping):
        raise OptionError("benchmark", f"benchmark must be a mapping of options, got {_show(cfg)}")
    return dict(cfg)


# ----------------------------------------------------------------------------- the sources
def _source(opts: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Where the data come from: [("name", n) | ("path", p) | ("target", {...})], one per dataset."""
    if opts["kind"] == "sequence":
        return [("name", n) for n in opts["datasets"]]
    if "dataset" not in opts or "path" not in opts:  # a kind registered without SOURCE's options
        raise ValueError(f"benchmark kind {opts['kind']} declares neither benchmark.dataset nor benchmark.path")
    dataset, path = opts.get("dataset"), opts.get("path")
    if path is not None:
        return [("path", path)]
    if isinstance(dataset, Mapping):
        return [("target", dataset)]
    return [("name", dataset)]


def _label(source: tuple[str, Any]) -> str:
    how, what = source
    if how == "path":
        return os.path.basename(str(what))
    if how == "target":
        return str(what.get("_target_"))
    return str(what)


def _check_source(opts: dict[str, Any]) -> None:
    """One source, and what can be known of it without reading data."""
    if opts["kind"] == "sequence":
        if not opts["datasets"]:
            raise DatasetNames().error("benchmark.datasets", [])
        return
    _source(opts)  # the kind declares where its data come from
    if opts["path"] is not None and opts["dataset"] is not None:
        raise OptionError(
            "benchmark.path",
            f"benchmark.path and benchmark.dataset are both set ({opts['path']!r}, {_show(opts['dataset'])}); "
            "the data come from one of them: set the other to null",
        )
    if opts["path"] is None and opts["dataset"] is None:
        raise OptionError(
            "benchmark.path",
            "benchmark.path must be the path of an .npz or .pt file (or benchmark.dataset a dataset), got None",
        )
    if opts["path"] is not None:
        arrays.resolve(opts["path"])  # exists and is readable (no data read)
    elif isinstance(opts["dataset"], Mapping):
        vision.check_target(opts["dataset"])  # imports the class and checks its arguments (no data read)


def _static_shapes(opts: Mapping[str, Any]) -> list[tuple[tuple[int, ...], list[int], int, int]] | None:
    """(sample shape, classes, n_train, n_test) of each registered dataset, or None (a file or a class)."""
    out = []
    for how, what in _source(opts):
        if how != "name":
            return None
        info = INFO[what]
        out.append((info.shape, list(range(info.n_classes)), info.n_train, info.n_test))
    return out


def _check_shape(opts: Mapping[str, Any], shape: tuple[int, ...], where: str) -> None:
    """pad, rotation and normalize against one sample's shape (C, H, W) or (D,)."""
    pad = opts["pad"]
    if len(shape) == 1:
        if pad:
            raise OptionError(
                "benchmark.pad",
                f"benchmark.pad={pad}: {where} holds feature vectors ({shape[0]} values), not images; "
                "set benchmark.pad=0",
            )
        if opts["kind"] == "rotated":
            raise OptionError(
                "benchmark.kind",
                f"benchmark.kind=rotated rotates images but {where} holds feature vectors ({shape[0]} values); "
                "choose kind split or permuted",
            )
        channels = 1
    else:
        channels, h, w = shape
        side, most = max(h, w), max(4 * max(h, w), 64)
        if pad and not side <= pad <= most:
            raise OptionError(
                "benchmark.pad",
                f"benchmark.pad must be 0 (keep the {h}×{w} images of {where}) or a size in [{side}, {most}], "
                f"got {pad}",
            )
    norm = opts["normalize"]
    if isinstance(norm, Mapping):
        for key in ("mean", "std"):
            value = norm[key]
            if isinstance(value, list) and len(value) not in (1, channels):
                raise OptionError(
                    f"benchmark.normalize.{key}",
                    f"benchmark.normalize.{key} must be one value or one per channel ({channels} for {where}), "
                    f"got {value}",
                )


_SPLIT_DEFAULTS = {"n_tasks": None, "classes_per_task": None, "class_order": None, "shuffle_classes": False}


def _split_plan(
    opts: Mapping[str, Any], classes: list[int], where: str, has_ids: bool = False
) -> tuple[list[int], int, int] | None:
    """(class order before shuffling, n_tasks, classes_per_task) of a split; None for data with task
    ids (one task per id, and the class options must stay unset)."""
    if has_ids:
        for key, default in _SPLIT_DEFAULTS.items():
            if opts.get(key) != default:
                unset = "null" if default is None else "false"
                raise OptionError(
                    f"benchmark.{key}",
                    f"benchmark.{key}={_show(opts[key])}: {where} brings its own tasks (t_train, t_test: one task "
                    f"per id); set benchmark.{key}={unset}, or remove the task ids to cut the data by classes",
                )
        return None
    known = set(classes)
    given = opts["class_order"] is not None
    order = list(opts["class_order"]) if given else list(classes)
    if given:
        bad = [c for c in order if c not in known]
        if bad:
            shown = f"0..{max(classes)}" if classes == list(range(len(classes))) else str(sorted(classes)[:20])
            raise OptionError(
                "benchmark.class_order",
                f"benchmark.class_order holds {', '.join(map(str, bad[:5]))}, not a class of {where} (its classes: "
                f"{shown})",
            )
    n, k, total = opts["n_tasks"], opts["classes_per_task"], len(order)
    them = f"the {total} classes of {'benchmark.class_order' if given else where}"
    if n is not None and k is not None:
        if n * k > total:
            raise OptionError(
                "benchmark.n_tasks",
                f"benchmark.n_tasks={n} × benchmark.classes_per_task={k} needs {n * k} classes but {where} has "
                f"{total}{' in benchmark.class_order' if given else ''}",
            )
        return order, n, k
    if n is not None:
        if n > total or total % n:
            raise OptionError(
                "benchmark.n_tasks",
                f"benchmark.n_tasks={n} does not cut {them} into equal tasks; set benchmark.classes_per_task "
                f"too (n_tasks × classes_per_task ≤ {total})",
            )
        return order, n, total // n
    k_given = k is not None
    k = k if k_given else DEFAULT_CLASSES_PER_TASK
    if k > total or total % k:
        shown = f"={k}" if k_given else f"=null ({k} classes per task)"
        raise OptionError(
            "benchmark.classes_per_task",
            f"benchmark.classes_per_task{shown} does not cut {them} into equal tasks; set benchmark.n_tasks too "
            f"(n_tasks × classes_per_task ≤ {total})",
        )
    return order, total // k, k


def benchmark_options(cfg: Any, scenario: str | None = None) -> dict[str, Any]:
    """Every option of the benchmark node, checked against its kind's declarations (an unknown key is
    refused naming the valid ones) and completed with the declared defaults; then what can be checked
    without reading data (the source, and for registered datasets: pad, normalize, the class split).
    OptionError / ValueError with one line naming ``benchmark.<key>`` otherwise. Reads no file."""
    node = _plain(cfg)
    kind = node.get("kind")
    kind = "split" if kind is None else kind
    if not isinstance(kind, str) or kind not in KINDS:
        raise OptionError(
            "benchmark.kind", f"benchmark.kind={_show(kind)} is not valid; choose one of: {', '.join(KINDS)}"
        )
    specs = declared_options(kind)
    for key in node:
        if key not in specs:
            raise unknown_key(f"benchmark.{key}", sorted(specs), f"benchmark kind {kind}")
    opts = {key: spec.check(f"benchmark.{key}", node.get(key, default)) for key, (spec, default) in specs.items()}
    opts["kind"] = kind
    opts["name"] = opts["name"] or kind
    fits = opts["scenarios"]
    if scenario is not None and fits and scenario not in fits:
        raise ValueError(
            f"scenario={scenario} does not fit benchmark {opts['name']} (see benchmark.scenarios); "
            f"choose one of: {', '.join(fits)}"
        )
    _check_source(opts)
    known = _static_shapes(opts)
    if known is not None:
        names = [_label(s) for s in _source(opts)]
        padded = set()
        for (shape, classes, _, _), name in zip(known, names, strict=True):
            _check_shape(opts, shape, name)
            if kind == "split":
                _split_plan(opts, classes, name)
            padded.add(_padded(shape, opts["pad"]))
        if len(padded) > 1:
            raise OptionError(
                "benchmark.pad",
                f"benchmark.datasets have different image shapes {sorted(padded)}; set benchmark.pad to one size",
            )
    return opts


def check_benchmark(cfg: Any, scenario: str) -> str:
    """The benchmark's kind, after checking every option (:func:`benchmark_options`) and that
    ``scenario`` fits the benchmark; cheap (no data file is read), so cl-run checks it before a run
    folder is made."""
    return benchmark_options(cfg, scenario)["kind"]


def _padded(shape: tuple[int, ...], pad: int) -> tuple[int, ...]:
    if len(shape) != 3:
        return tuple(shape)
    c, h, w = shape
    return (c, pad, pad) if pad > max(h, w) else (c, h, w)


def _default_data_dir(data_dir: str | None) -> str:
    return data_dir if data_dir is not None else os.environ.get("CL_RUNNER_DATA", "./data")


def _sample_shapes(opts: Mapping[str, Any], data_dir: str | None, download: bool) -> list[tuple[int, ...]]:
    """Each source's sample shape before padding: the registry, a file's header (no data read), or
    the first test sample of a dataset class (the class is built, which reads its files)."""
    out = []
    for how, what in _source(opts):
        if how == "name":
            out.append(INFO[what].shape)
        elif how == "path":
            entries = arrays.header(what)
            shape = arrays.sample_shape(entries)
            _check_shape(opts, shape, _label((how, what)))
            _check_task_ids(opts, all(k in entries for k in arrays.TASK_IDS), _label((how, what)))
            out.append(shape)
        else:
            shape = vision.target_shape(what, _default_data_dir(data_dir), download)
            _check_shape(opts, shape, _label((how, what)))
            out.append(shape)
    return out


def input_shape(cfg: Any, data_dir: str | None = None, download: bool = False) -> tuple[int, ...]:
    """The model's input shape, (C, H, W) for images or (D,) for feature vectors, from the datasets'
    registered shapes and ``pad`` without reading any file; for a ``path`` file, from its header
    (shapes only); for a ``dataset._target_`` class, from its first test sample (the class is built:
    it reads its files, in ``data_dir``). A model that does not fit is then refused before a run."""
    opts = benchmark_options(cfg)
    return _padded(_sample_shapes(opts, data_dir, download)[0], opts["pad"])


# ----------------------------------------------------------------------------- memory
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
    if kind == "split":
        how, name = _source(opts)[0]
        classes = INFO[name].n_classes if how == "name" else None  # a file's classes: all of it, at most
        plan = _split_plan(opts, list(range(classes)), name) if classes else None
        share = plan[1] * plan[2] / classes if plan else 1.0
        n_tasks = plan[1] if plan else 1
        copies, task_train, task_test = share, share * n_train / n_tasks, share * n_test / n_tasks
        what = f"{n_tasks} task{'s' if n_tasks > 1 else ''} cut from {n_all} samples"
        key = "benchmark.pad" if pad else ("benchmark.path" if opts.get("path") else "benchmark.dataset")
    elif kind == "permuted":
        n_tasks = opts["n_tasks"]
        copies = n_tasks - (0 if opts["permute_first"] else 1)
        task_train, task_test = n_train, n_test
        what = f"{n_tasks} tasks of {n_all} samples"
        key = "benchmark.n_tasks"
    elif kind == "rotated":
        n_tasks = len(opts["angles"])
        copies = sum(1 for a in opts["angles"] if float(a) % 360 != 0)
        task_train, task_test = n_train, n_test
        what = f"{n_tasks} tasks of {n_all} samples"
        key = "benchmark.angles"
    else:
        n_tasks, copies = len(sizes), 0
        task_train, task_test = n_train / max(n_tasks, 1), n_test / max(n_tasks, 1)
        what = f"{n_tasks} datasets of {n_all} samples"
        key = "benchmark.datasets"
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
            shown = f"[{len(value)} values]" if isinstance(value, list) and len(value) > 8 else _show(value)
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
#: data read by :func:`check_data`, taken (once) by the next :func:`build_stream` that needs them
_READ: dict[tuple, RawDataset] = {}


def _read_key(source: tuple[str, Any], data_dir: str, download: bool, seed: int) -> tuple:
    how, what = source
    if how == "path":
        full = os.path.abspath(os.path.expanduser(str(what)))
        try:
            st = os.stat(full)
        except OSError:
            return (how, full)
        return (how, full, st.st_mtime_ns, st.st_size)
    folder = os.path.abspath(os.path.expanduser(str(data_dir)))
    if how == "target":
        return (how, repr(sorted((str(k), repr(v)) for k, v in what.items())), folder, bool(download))
    return (how, what, folder, bool(download), int(seed))


def _read(source: tuple[str, Any], data_dir: str, download: bool, seed: int) -> RawDataset:
    kept = _READ.pop(_read_key(source, data_dir, download, seed), None)
    if kept is not None:
        return kept
    how, what = source
    if how == "path":
        return arrays.load(what)
    if how == "target":
        return vision.load_target(what, data_dir, download)
    return load_dataset(what, data_dir, download, seed)


def _classes(raw: RawDataset) -> list[int]:
    """A registered dataset's classes 0..n-1; for the user's data, the labels its training set holds."""
    if not raw.source:
        return list(range(raw.n_classes))
    return sorted(set(raw.y_train.unique().tolist()))


def _check_task_ids(opts: Mapping[str, Any], has_ids: bool, where: str) -> None:
    """Data with their own task ids: only kind split takes them, with its class options unset."""
    if not has_ids:
        return
    if opts["kind"] != "split":
        raise OptionError(
            "benchmark.kind",
            f"benchmark.kind={opts['kind']} makes its tasks from the whole data, but {where} brings its own "
            "(t_train, t_test); use kind split (one task per id: benchmark=arrays), or remove the task ids",
        )
    _split_plan(opts, [], where, has_ids=True)


def _check_read(opts: Mapping[str, Any], raw: RawDataset, source: tuple[str, Any]) -> None:
    """The checks that need the data (the user's file or dataset class): shape, classes, task ids."""
    if source[0] == "name":
        return
    where = _label(source)
    _check_shape(opts, tuple(raw.x_train.shape[1:]), where)
    _check_task_ids(opts, raw.t_train is not None, where)
    if opts["kind"] == "split" and raw.t_train is None:
        _split_plan(opts, _classes(raw), where)


def check_data(cfg: Any, data_dir: str, download: bool = True, seed: int = 0, keep: bool = True) -> None:
    """Read every dataset the benchmark needs and check it (damaged or missing files, labels out of
    range, the user's file or dataset class against the options): DatasetUnavailable / ValueError with
    one line naming the file or key. With ``keep``, the data stay in memory for the next
    :func:`build_stream` with the same source in this process (read once: a precheck followed by the
    run); without, they are dropped (e.g. a sweep whose jobs run elsewhere)."""
    opts = benchmark_options(cfg)
    _READ.clear()
    for source in _source(opts):
        raw = _read(source, data_dir, download, seed)
        _check_read(opts, raw, source)
        if keep:
            _READ[_read_key(source, data_dir, download, seed)] = raw


def _prepare(raw: RawDataset, size: int, device: torch.device) -> RawDataset:
    return RawDataset(
        raw.name,
        T.pad(raw.x_train.to(device), size),
        raw.y_train.to(device),
        T.pad(raw.x_test.to(device), size),
        raw.y_test.to(device),
        raw.n_classes,
        None if raw.t_train is None else raw.t_train.to(device),
        None if raw.t_test is None else raw.t_test.to(device),
        raw.source,
    )


def _subset(x: Tensor, y: Tensor, limit: int | None, g: torch.Generator) -> tuple[Tensor, Tensor]:
    if limit is None or limit >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=g)[:limit].to(x.device)
    return x[idx], y[idx]


def build_stream(
    cfg: Mapping[str, Any],
    scenario: str,
    seed: int,
    device: torch.device | str,
    data_dir: str,
    download: bool = True,
    active_units: str = "seen",
) -> TaskStream:
    device = torch.device(device)
    opts = benchmark_options(cfg, scenario)
    kind, sources = opts["kind"], _source(opts)
    sizes = _sizes(opts)
    if sizes is not None:
        _check_fits(opts, sizes, device)  # before anything is read or allocated
    g = torch.Generator().manual_seed(int(seed))
    loaded = []
    for source in sources:
        loaded.append(_read(source, data_dir, download, seed))
        _check_read(opts, loaded[-1], source)
    if sizes is None:  # a dataset class: its size is known now
        _check_fits(opts, [(len(r.y_train), len(r.y_test), tuple(r.x_train.shape[1:])) for r in loaded], device)
    raws = []
    while loaded:  # each unpadded copy is freed as soon as its padded one exists
        raws.append(_prepare(loaded.pop(0), opts["pad"], device))
    shapes = {tuple(r.x_train.shape[1:]) for r in raws}
    if len(shapes) != 1:
        raise ValueError(f"benchmark.datasets have different image shapes {sorted(shapes)}; set benchmark.pad")

    parts = KINDS[kind](opts, raws, g)
    norm = opts["normalize"]
    if norm == "auto":
        x_all = raws[0].x_train if len(raws) == 1 else torch.cat([r.x_train for r in raws])
        mean, std = T.channel_stats(x_all)
        del x_all
        flat = [s for s in std if not (s > 0 and math.isfinite(s))]
        if flat:
            channel = std.index(flat[0])
            raise ValueError(
                f"benchmark.normalize=auto: channel {channel} of the training data has std {flat[0]} (every value "
                "the same); give benchmark.normalize={mean: …, std: …} or null"
            )
    elif norm is not None:
        mean, std = norm["mean"], norm["std"]

    train_units, own_units, n_outputs = assign_units([p.classes for p in parts], scenario, active_units)
    max_train, max_test = opts["max_train_per_task"], opts["max_test_per_task"]
    tasks = []
    for t, p in enumerate(parts):
        xtr, ytr = _subset(p.x_train, p.y_train, max_train, g)
        xte, yte = _subset(p.x_test, p.y_test, max_test, g)
        classes = p.classes
        if norm is not None:
            xtr, xte = T.normalize(xtr, mean, std), T.normalize(xte, mean, std)
        tasks.append(
            Task(
                id=t,
                name=p.name,
                x_train=xtr.contiguous(),
                y_train=label_to_unit(ytr.cpu(), classes, own_units[t]).to(device),
                x_test=xte.contiguous(),
                y_test=label_to_unit(yte.cpu(), classes, own_units[t]).to(device),
                classes=classes,
                units=train_units[t],
                own_units=own_units[t],
            )
        )
    names = [str(what) if how != "target" else str(what.get("_target_")) for how, what in sources]
    info = {"kind": kind, "datasets": names, "normalize": None if norm is None else {"mean": mean, "std": std}}
    return TaskStream(
        name=str(opts["name"]),
        scenario=scenario,
        tasks=tasks,
        n_outputs=n_outputs,
        input_shape=tuple(parts[0].x_train.shape[1:]),
        info=info,
        active_units=active_units,
    )


# ----------------------------------------------------------------------------- kinds
def _by_task_id(raw: RawDataset) -> list[Part]:
    parts = []
    for t in range(int(raw.t_train.max()) + 1):
        tr, te = raw.t_train == t, raw.t_test == t
        classes = sorted(set(raw.y_train[tr].unique().tolist()))
        parts.append(
            Part(f"{raw.name}-task{t}", raw.x_train[tr], raw.y_train[tr], raw.x_test[te], raw.y_test[te], classes)
        )
    return parts


@register_kind("split", options=SPLIT_OPTIONS)
def split(cfg: Mapping[str, Any], raws: list[RawDataset], g: torch.Generator) -> list[Part]:
    raw = raws[0]
    if raw.t_train is not None:
        return _by_task_id(raw)
    order, n_tasks, per_task = _split_plan(cfg, _classes(raw), raw.name)
    if cfg["shuffle_classes"]:
        order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
    parts = []
    for t in range(n_tasks):
        classes = [int(c) for c in order[t * per_task : (t + 1) * per_task]]
        cls = torch.as_tensor(classes, device=raw.y_train.device)
        tr, te = torch.isin(raw.y_train, cls), torch.isin(raw.y_test, cls)
        name = f"{raw.name}[{','.join(map(str, classes))}]"
        parts.append(Part(name, raw.x_train[tr], raw.y_train[tr], raw.x_test[te], raw.y_test[te], classes))
    return parts


@register_kind("permuted", options=PERMUTED_OPTIONS)
def permuted(cfg: Mapping[str, Any], raws: list[RawDataset], g: torch.Generator) -> list[Part]:
    raw, parts = raws[0], []
    n_pixels = T.pixel_count(raw.x_train)
    for t in range(int(cfg["n_tasks"])):
        perm = T.pixel_permutation(n_pixels, g)  # drawn for every task so seeds match either way
        if t == 0 and not cfg["permute_first"]:
            xtr, xte = raw.x_train, raw.x_test
        else:
            xtr, xte = T.permute_pixels(raw.x_train, perm), T.permute_pixels(raw.x_test, perm)
        parts.append(Part(f"{raw.name}-perm{t}", xtr, raw.y_train, xte, raw.y_test, _classes(raw)))
    return parts


@register_kind("rotated", options=ROTATED_OPTIONS)
def rotated(cfg: Mapping[str, Any], raws: list[RawDataset], g: torch.Generator) -> list[Part]:
    raw = raws[0]
    return [
        Part(
            f"{raw.name}-rot{angle:g}",
            T.rotate(raw.x_train, angle),
            raw.y_train,
            T.rotate(raw.x_test, angle),
            raw.y_test,
            _classes(raw),
        )
        for angle in _get(cfg, "angles", [0, 20, 40, 60, 80])
    ]


@register_kind("sequence", options=SEQUENCE_OPTIONS)
def sequence(cfg: Mapping[str, Any], raws: list[RawDataset], g: torch.Generator) -> list[Part]:
    return [Part(r.name, r.x_train, r.y_train, r.x_test, r.y_test, list(range(r.n_classes))) for r in raws]
