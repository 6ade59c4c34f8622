"""Datasets as whole tensors: each loader returns images scaled to [0, 1] with shape (N, C, H, W)
and integer labels, read once. Loaders register themselves in ``LOADERS`` by name, with what is
known about the dataset without reading it (``INFO``: image shape, class count, split sizes), so that
a benchmark's options, the model's fit and the task stream's memory are checked before a run starts.

A dataset whose labels fall outside ``0..n_classes-1`` is refused (:func:`check_labels`), never
cut down silently."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class DatasetUnavailable(RuntimeError):
    """The dataset's files are missing, damaged or cannot be downloaded; the one-line message names
    the file or folder and says what to do."""


@dataclass
class RawDataset:
    name: str
    x_train: Tensor  # float32 (N, C, H, W) in [0, 1]; (N, D) for feature vectors (user arrays)
    y_train: Tensor  # int64 (N,)
    x_test: Tensor
    y_test: Tensor
    n_classes: int
    t_train: Tensor | None = None  # int64 (N,) task ids 0..T-1, when the data come with their own tasks
    t_test: Tensor | None = None
    source: str = ""  # where the data came from (a file, a dataset class), for messages


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a registered dataset without reading it."""

    shape: tuple[int, int, int]  # (C, H, W) of one image
    n_classes: int
    n_train: int  # sizes of the two splits (for the memory estimate)
    n_test: int


Loader = Callable[..., RawDataset]
LOADERS: dict[str, Loader] = {}
INFO: dict[str, DatasetInfo] = {}
#: image shape (C, H, W) of each dataset, known without reading it (checks before a run starts)
SHAPES: dict[str, tuple[int, int, int]] = {}


def register(
    name: str, shape: tuple[int, int, int], n_classes: int = 10, sizes: tuple[int, int] = (0, 0)
) -> Callable[[Loader], Loader]:
    """Register a loader ``(data_dir, download, seed) -> RawDataset`` under ``name``, with the image
    shape, the number of classes and the (train, test) sizes of its splits."""

    def wrap(fn: Loader) -> Loader:
        LOADERS[name], SHAPES[name] = fn, tuple(shape)
        INFO[name] = DatasetInfo(tuple(shape), int(n_classes), int(sizes[0]), int(sizes[1]))
        return fn

    return wrap


def check_labels(y: Tensor, n_classes: int, where: str) -> None:
    """DatasetUnavailable naming ``where`` if a label is outside 0..n_classes-1 (never dropped silently)."""
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_classes:
        bad = y[(y < 0) | (y >= n_classes)]
        values = ", ".join(str(v) for v in sorted(set(bad[:1000].tolist()))[:5])
        raise DatasetUnavailable(
            f"{where}: {len(bad)} labels out of range for {n_classes} classes (0..{n_classes - 1}): {values}; "
            "the file is damaged or not this dataset's"
        )


def load_dataset(name: str, data_dir: str, download: bool, seed: int) -> RawDataset:
    if name not in LOADERS:
        raise ValueError(f"benchmark.dataset={name!r} is unknown; choose one of: {', '.join(sorted(LOADERS))}")
    raw = LOADERS[name](data_dir=data_dir, download=download, seed=seed)
    for split in ("train", "test"):
        check_labels(getattr(raw, f"y_{split}"), raw.n_classes, f"{name} ({split} labels)")
    return raw


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images (1797, 8, 8), labels): its bundled ``digits.csv.gz`` read
    directly, because importing ``sklearn.datasets`` (and with it SciPy) takes longer than the rest of a
    small run's start-up together (0.7 s of 3.8 s); ``sklearn.datasets.load_digits`` where that file is
    not where scikit-learn has kept it (tests/test_stream.py checks the two agree)."""
    import gzip
    from importlib.util import find_spec

    spec = find_spec("sklearn")  # finds the package without importing it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits as sk_digits

        bunch = sk_digits()
        return bunch.images, bunch.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


@register("digits", shape=(1, 8, 8), n_classes=10, sizes=(1258, 539))
def load_digits(data_dir: str, download: bool, seed: int, test_fraction: float = 0.3) -> RawDataset:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, no download). The test split
    holds ``test_fraction`` of each class, drawn with a generator seeded by ``seed``."""
    images, target = _sklearn_digits()
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(target, dtype=torch.long)
    g = torch.Generator().manual_seed(int(seed))
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_mask[idx[: round(test_fraction * len(idx))]] = True
    return RawDataset("digits", x[~test_mask], y[~test_mask], x[test_mask], y[test_mask], 10)
