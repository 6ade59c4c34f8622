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
- ``rotated``:  one task per angle in ``angles`` (degrees), or ``angles: random`` with ``n_tasks`` angles
                drawn from the seed in ``angle_range``; ``interpolation`` bilinear | nearest;
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
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from cl_runner.data import arrays, target
from cl_runner.data import transforms as T
from cl_runner.data.datasets import INFO, RawDataset, load_dataset
from cl_runner.data.declarations import (  # noqa: F401  (the kinds' registry, also as this module's)
    COMMON,
    KIND_OPTIONS,
    KINDS,
    PERMUTED_OPTIONS,
    ROTATED_OPTIONS,
    SEQUENCE_OPTIONS,
    SOURCE,
    SPLIT_OPTIONS,
    Part,
    _check_shape,
    _check_source,
    _get,
    _label,
    _padded,
    _plain,
    _source,
    _split_plan,
    _static_shapes,
    benchmark_options,
    declared_options,
    register_kind,
    show,
)
from cl_runner.data.memory import _check_fits, _sizes, check_memory, estimate_bytes  # noqa: F401
from cl_runner.data.stream import Task, TaskStream, assign_units, label_to_unit
from cl_runner.options import (
    OptionError,
)


def check_benchmark(cfg: Any, scenario: str) -> str:
    """The benchmark's kind, after checking every option (:func:`benchmark_options`) and that
    ``scenario`` fits the benchmark; cheap (no data file is read), so cl-run checks it before a run
    folder is made."""
    return benchmark_options(cfg, scenario)["kind"]


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
            shape = target.target_shape(what, _default_data_dir(data_dir), download)
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
        return target.load_target(what, data_dir, download)
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


def _load(opts, sources, sizes, data_dir: str, download: bool, seed: int, device: torch.device) -> list[RawDataset]:
    """Every source read (and checked), padded and on the device; the memory check first when the
    sizes are known, else once a dataset class has been read."""
    if sizes is not None:
        _check_fits(opts, sizes, device)  # before anything is read or allocated
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
    return raws


def _normalization(norm: Any, raws: list[RawDataset]) -> tuple[Any, Any]:
    """(mean, std) of ``benchmark.normalize``: given, or (``auto``) the training data's per channel."""
    if norm != "auto":
        return norm["mean"], norm["std"]
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
    return mean, std


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
    raws = _load(opts, sources, sizes, data_dir, download, seed, device)
    parts = KINDS[kind](opts, raws, g)
    norm = opts["normalize"]
    mean, std = _normalization(norm, raws) if norm is not None else (None, None)
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
    raw, interpolation = raws[0], cfg["interpolation"]
    return [
        Part(
            f"{raw.name}-rot{angle:g}",
            T.rotate(raw.x_train, angle, interpolation),
            raw.y_train,
            T.rotate(raw.x_test, angle, interpolation),
            raw.y_test,
            _classes(raw),
        )
        for angle in rotation_angles(cfg, g)
    ]


def rotation_angles(cfg: Mapping[str, Any], g: torch.Generator) -> list[float]:
    """The ``rotated`` kind's angles in degrees: the list ``angles``, or with ``angles: random`` one angle
    per task for ``n_tasks`` tasks, each uniform in [low, high) = ``angle_range``, drawn from the run's
    seeded generator (mammoth's R-MNIST draws ``np.random.uniform(0, 180)`` per task). ``cfg``: the
    checked options (:func:`benchmark_options`)."""
    if cfg["angles"] != "random":
        return [float(a) for a in cfg["angles"]]
    lo, hi = (float(v) for v in cfg["angle_range"])
    return (lo + (hi - lo) * torch.rand(int(cfg["n_tasks"]), generator=g, dtype=torch.float64)).tolist()


@register_kind("sequence", options=SEQUENCE_OPTIONS)
def sequence(cfg: Mapping[str, Any], raws: list[RawDataset], g: torch.Generator) -> list[Part]:
    return [Part(r.name, r.x_train, r.y_train, r.x_test, r.y_test, list(range(r.n_classes))) for r in raws]
