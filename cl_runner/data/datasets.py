"""Datasets as whole tensors: each loader returns images scaled to [0, 1] with shape (N, C, H, W)
and integer labels, read once. Loaders register themselves in ``LOADERS`` by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


class DatasetUnavailable(RuntimeError):
    """The dataset's files are missing and cannot be downloaded; the message says what to do."""


@dataclass
class RawDataset:
    name: str
    x_train: Tensor  # float32 (N, C, H, W) in [0, 1]
    y_train: Tensor  # int64 (N,)
    x_test: Tensor
    y_test: Tensor
    n_classes: int


Loader = Callable[..., RawDataset]
LOADERS: dict[str, Loader] = {}
#: image shape (C, H, W) of each dataset, known without reading it (checks before a run starts)
SHAPES: dict[str, tuple[int, int, int]] = {}


def register(name: str, shape: tuple[int, int, int]) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        LOADERS[name], SHAPES[name] = fn, tuple(shape)
        return fn

    return wrap


def load_dataset(name: str, data_dir: str, download: bool, seed: int) -> RawDataset:
    if name not in LOADERS:
        raise ValueError(f"benchmark dataset {name!r} is unknown; choose one of: {', '.join(sorted(LOADERS))}")
    return LOADERS[name](data_dir=data_dir, download=download, seed=seed)


@register("digits", shape=(1, 8, 8))
def load_digits(data_dir: str, download: bool, seed: int, test_fraction: float = 0.3) -> RawDataset:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, no download). The test split
    holds ``test_fraction`` of each class, drawn with a generator seeded by ``seed``."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    g = torch.Generator().manual_seed(int(seed))
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_mask[idx[: round(test_fraction * len(idx))]] = True
    return RawDataset("digits", x[~test_mask], y[~test_mask], x[test_mask], y[test_mask], 10)
