"""The options of a ``benchmark`` node, each declared once with its type, range and default
(:mod:`cl_runner.options` specs): the options every kind has (:data:`COMMON`), where the data come from
(:data:`SOURCE`), and each kind's own (registered with its builder: :func:`register_kind`); and the
checks that need no file: the data source, the shapes and classes the registered datasets are known
to have, and the split into tasks. :mod:`cl_runner.data.benchmarks` builds the stream."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cl_runner.data import arrays, target
from cl_runner.data.datasets import INFO, RawDataset
from cl_runner.data.specs import DataPath, Dataset, DatasetNames, Described, Name, Normalize  # noqa: F401
from cl_runner.data.stream import SCENARIOS
from cl_runner.options import (
    AnyOf,
    Anything,
    Bool,
    Choice,
    Float,
    Int,
    OptionError,
    Spec,
    show,
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


# ----------------------------------------------------------------------------- declarations
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
        AnyOf(
            alternatives=(
                Choice(choices=("random",)),
                Described(
                    item=Float(lo=-360, hi=360),
                    max_len=MAX_TASKS,
                    described="a list of angles in degrees, each in [-360, 360]",
                ),
            )
        ),
        [0, 20, 40, 60, 80],
    ),
    # with angles: random, n_tasks angles drawn uniformly in angle_range from the run's seed
    "n_tasks": (Int(lo=1, hi=MAX_TASKS, optional=True, null_means="one task per angle of benchmark.angles"), None),
    "angle_range": (
        Described(item=Float(lo=-360, hi=360), min_len=2, max_len=2, described="[low, high] in degrees, low < high"),
        [0, 180],
    ),
    # bilinear (grid_sample) | nearest (PIL's Image.rotate, as torchvision rotates a PIL image: mammoth's R-MNIST)
    "interpolation": (Choice(choices=("bilinear", "nearest")), "bilinear"),
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
        raise OptionError("benchmark", f"benchmark must be a mapping of options, got {show(cfg)}")
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
            f"benchmark.path and benchmark.dataset are both set ({opts['path']!r}, {show(opts['dataset'])}); "
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
        target.check_target(opts["dataset"])  # imports the class and checks its arguments (no data read)


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
                    f"benchmark.{key}={show(opts[key])}: {where} brings its own tasks (t_train, t_test: one task "
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
            "benchmark.kind", f"benchmark.kind={show(kind)} is not valid; choose one of: {', '.join(KINDS)}"
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
    if kind == "rotated":
        _check_rotation(opts)
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


def _check_rotation(opts: Mapping[str, Any]) -> None:
    """``angles: random`` needs ``n_tasks``, a list of angles none; ``angle_range`` is [low, high), low < high."""
    if opts["angles"] == "random" and opts["n_tasks"] is None:
        raise OptionError(
            "benchmark.n_tasks", "benchmark.n_tasks must be a positive integer with benchmark.angles=random"
        )
    if opts["angles"] != "random" and opts["n_tasks"] is not None:
        raise OptionError(
            "benchmark.n_tasks",
            f"benchmark.n_tasks={opts['n_tasks']} applies to benchmark.angles=random only (a list of angles is one "
            "task per angle); leave it out",
        )
    lo, hi = opts["angle_range"]
    if not lo < hi:
        raise OptionError(
            "benchmark.angle_range", f"benchmark.angle_range must be [low, high] with low < high, got {[lo, hi]}"
        )


def _padded(shape: tuple[int, ...], pad: int) -> tuple[int, ...]:
    if len(shape) != 3:
        return tuple(shape)
    c, h, w = shape
    return (c, pad, pad) if pad > max(h, w) else (c, h, w)
