"""Build a :class:`TaskStream` from a ``benchmark`` config: load the dataset(s) once, move them to
the device, apply the task transforms as tensor operations, and assign output units per scenario.

Benchmark kinds (``benchmark.kind``), each a builder registered in ``KINDS`` (``@register_kind("name")``) that
turns the loaded datasets into the stream's tasks (a :class:`Part` each):

- ``split``:    one dataset cut into tasks by class (``n_tasks`` × ``classes_per_task``; fixed
                ``class_order`` or, with ``shuffle_classes``, an order drawn from the seed);
- ``permuted``: one dataset, ``n_tasks`` fixed pixel permutations drawn from the seed
                (``permute_first: false`` keeps task 1 unpermuted);
- ``rotated``:  one dataset, one task per angle in ``angles`` (degrees), or ``angles: random`` with
                ``n_tasks`` angles drawn from the seed in ``angle_range``; ``interpolation`` bilinear | nearest;
- ``sequence``: one task per dataset in ``datasets`` (e.g. MNIST then Fashion-MNIST).

Input options for every kind: ``pad`` (zero-pad to a square size, centred), ``normalize`` (null,
``auto`` = the padded training set's per-channel statistics, or ``{mean: …, std: …}``), and
``max_train_per_task`` / ``max_test_per_task`` (a seeded subset; for quick tests), and
``scenarios`` (the scenarios that make sense for the benchmark; others are refused).
Order of operations: pad → task transform (permutation / rotation) → normalize.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cl_runner.data import transforms as T
from cl_runner.data.datasets import SHAPES, RawDataset, load_dataset
from cl_runner.data.stream import Task, TaskStream, assign_units, label_to_unit


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
KINDS: dict[str, Builder] = {}


def register_kind(name: str) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        KINDS[name] = fn
        return fn

    return register


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def _subset(x: Tensor, y: Tensor, limit: int | None, g: torch.Generator) -> tuple[Tensor, Tensor]:
    if not limit or limit >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=g)[:limit].to(x.device)
    return x[idx], y[idx]


def _prepare(raw: RawDataset, size: int, device: torch.device) -> RawDataset:
    return RawDataset(
        raw.name,
        T.pad(raw.x_train.to(device), size),
        raw.y_train.to(device),
        T.pad(raw.x_test.to(device), size),
        raw.y_test.to(device),
        raw.n_classes,
    )


def check_benchmark(cfg: Mapping[str, Any], scenario: str) -> str:
    """The benchmark's kind, after checking it and that ``scenario`` fits the benchmark; cheap (no
    file is read), so the app checks it before a run directory is made."""
    kind = _get(cfg, "kind", "split")
    if kind not in KINDS:
        raise ValueError(f"benchmark.kind={kind!r} is unknown; choose one of: {', '.join(KINDS)}")
    # benchmark.scenarios lists the scenarios that make sense for this benchmark (reasons in its yaml)
    fits = [str(s) for s in _get(cfg, "scenarios", [])]
    if fits and scenario not in fits:
        raise ValueError(
            f"scenario={scenario} does not fit benchmark {_get(cfg, 'name', kind)} (see benchmark.scenarios); "
            f"choose one of: {', '.join(fits)}"
        )
    return kind


def input_shape(cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    """The model's input shape (C, H, W) for a benchmark, from the datasets' registered shapes and
    ``pad``, without reading any file (so a model that does not fit is refused before a run)."""
    kind = _get(cfg, "kind", "split")
    names = list(_get(cfg, "datasets", [])) if kind == "sequence" else [_get(cfg, "dataset", "digits")]
    for name in names:
        if name not in SHAPES:
            raise ValueError(f"benchmark dataset {name!r} is unknown; choose one of: {', '.join(sorted(SHAPES))}")
    c, h, w = SHAPES[names[0]] if names else (1, 1, 1)
    size = int(_get(cfg, "pad", 0))
    return (c, size, size) if size > max(h, w) else (c, h, w)


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
    kind = check_benchmark(cfg, scenario)
    g = torch.Generator().manual_seed(int(seed))
    names = list(_get(cfg, "datasets", [])) if kind == "sequence" else [_get(cfg, "dataset", "digits")]
    if not names:
        raise ValueError("benchmark.datasets is empty: a sequence benchmark needs at least one dataset")
    raws = [_prepare(load_dataset(n, data_dir, download, seed), int(_get(cfg, "pad", 0)), device) for n in names]
    shapes = {tuple(r.x_train.shape[1:]) for r in raws}
    if len(shapes) != 1:
        raise ValueError(f"benchmark.datasets have different image shapes {sorted(shapes)}; set benchmark.pad")

    parts = KINDS[kind](cfg, raws, g)
    norm = _get(cfg, "normalize", None)
    if norm == "auto":
        mean, std = T.channel_stats(torch.cat([r.x_train for r in raws]))
    elif norm is not None:
        mean, std = norm["mean"], norm["std"]

    train_units, own_units, n_outputs = assign_units([p.classes for p in parts], scenario, active_units)
    max_train, max_test = _get(cfg, "max_train_per_task"), _get(cfg, "max_test_per_task")
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
    info = {"kind": kind, "datasets": names, "normalize": None if norm is None else {"mean": mean, "std": std}}
    return TaskStream(
        name=str(_get(cfg, "name", kind)),
        scenario=scenario,
        tasks=tasks,
        n_outputs=n_outputs,
        input_shape=tuple(parts[0].x_train.shape[1:]),
        info=info,
        active_units=active_units,
    )


@register_kind("split")
def split(cfg: Mapping[str, Any], raws: list[RawDataset], g: torch.Generator) -> list[Part]:
    raw = raws[0]
    n_tasks = int(_get(cfg, "n_tasks", 5))
    per_task = int(_get(cfg, "classes_per_task", raw.n_classes // n_tasks))
    order = list(_get(cfg, "class_order", range(raw.n_classes)))
    if _get(cfg, "shuffle_classes", False):
        order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
    if n_tasks * per_task > len(order):
        raise ValueError(
            f"benchmark asks for {n_tasks} tasks × {per_task} classes but {raw.name} has {len(order)} classes"
        )
    parts = []
    for t in range(n_tasks):
        classes = [int(c) for c in order[t * per_task : (t + 1) * per_task]]
        cls = torch.as_tensor(classes, device=raw.y_train.device)
        tr, te = torch.isin(raw.y_train, cls), torch.isin(raw.y_test, cls)
        name = f"{raw.name}[{','.join(map(str, classes))}]"
        parts.append(Part(name, raw.x_train[tr], raw.y_train[tr], raw.x_test[te], raw.y_test[te], classes))
    return parts


@register_kind("permuted")
def permuted(cfg: Mapping[str, Any], raws: list[RawDataset], g: torch.Generator) -> list[Part]:
    raw, parts = raws[0], []
    n_pixels = raw.x_train.shape[-1] * raw.x_train.shape[-2]
    for t in range(int(_get(cfg, "n_tasks", 10))):
        perm = T.pixel_permutation(n_pixels, g)  # drawn for every task so seeds match either way
        if t == 0 and not _get(cfg, "permute_first", True):
            xtr, xte = raw.x_train, raw.x_test
        else:
            xtr, xte = T.permute_pixels(raw.x_train, perm), T.permute_pixels(raw.x_test, perm)
        parts.append(Part(f"{raw.name}-perm{t}", xtr, raw.y_train, xte, raw.y_test, list(range(raw.n_classes))))
    return parts


@register_kind("rotated")
def rotated(cfg: Mapping[str, Any], raws: list[RawDataset], g: torch.Generator) -> list[Part]:
    raw = raws[0]
    interpolation = str(_get(cfg, "interpolation", "bilinear"))
    return [
        Part(
            f"{raw.name}-rot{angle:g}",
            T.rotate(raw.x_train, angle, interpolation),
            raw.y_train,
            T.rotate(raw.x_test, angle, interpolation),
            raw.y_test,
            list(range(raw.n_classes)),
        )
        for angle in rotation_angles(cfg, g)
    ]


def rotation_angles(cfg: Mapping[str, Any], g: torch.Generator) -> list[float]:
    """The ``rotated`` kind's angles in degrees: the list ``angles``, or with ``angles: random`` one angle
    per task for ``n_tasks`` tasks, each uniform in [lo, hi) = ``angle_range`` (default [0, 180)), drawn
    from the run's seeded generator (mammoth's R-MNIST draws ``np.random.uniform(0, 180)`` per task)."""
    angles = _get(cfg, "angles", [0, 20, 40, 60, 80])
    if angles == "random":
        n = _get(cfg, "n_tasks")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"benchmark.n_tasks must be a positive integer with benchmark.angles=random, got {n!r}")
        rng = list(_get(cfg, "angle_range", [0, 180]))
        if len(rng) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng):
            raise ValueError(f"benchmark.angle_range must be [low, high] in degrees, got {rng!r}")
        lo, hi = float(rng[0]), float(rng[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"benchmark.angle_range must be [low, high] with low < high, both finite, got {rng!r}")
        return (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)).tolist()
    if isinstance(angles, str) or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in angles):
        raise ValueError(f"benchmark.angles must be a list of numbers (degrees) or random, got {angles!r}")
    return [float(a) for a in angles]


@register_kind("sequence")
def sequence(cfg: Mapping[str, Any], raws: list[RawDataset], g: torch.Generator) -> list[Part]:
    return [Part(r.name, r.x_train, r.y_train, r.x_test, r.y_test, list(range(r.n_classes))) for r in raws]
