"""Real image datasets read through ``torchvision.datasets``: MNIST, Fashion-MNIST, KMNIST,
CIFAR-10 and CIFAR-100.

Each loader builds the torchvision dataset once per split, takes its raw uint8 storage
(``.data``: a tensor (N, 28, 28) for the MNIST family, a numpy array (N, 32, 32, 3) for CIFAR)
and its ``.targets``, and converts them to float (N, C, H, W) in [0, 1] in one tensor operation.
No per-sample transform and no DataLoader are involved; :func:`cl_runner.data.benchmarks.build_stream`
moves the tensors to the device.

Files on disk (``data_dir`` is torchvision's ``root``; torchvision's own layout):

- ``mnist``:         ``<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
- ``fashion_mnist``: the same four files under ``<data_dir>/FashionMNIST/raw/``
- ``kmnist``:        the same four files under ``<data_dir>/KMNIST/raw/``
- ``cifar10``:       ``<data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
- ``cifar100``:      ``<data_dir>/cifar-100-python/{train,test,meta}``

The MNIST-family reader wants the IDX files decompressed; with ``download=true`` torchvision
also accepts the original ``*.gz`` files (or the CIFAR ``*.tar.gz`` archive) placed in that
folder and extracts them without going online when their checksums match.

Missing files (or a download that fails, e.g. offline) raise :class:`DatasetUnavailable` with a
one-line message naming the dataset, the folder and the expected files.

torchvision is imported inside the loaders, and only when needed: importing it costs seconds (it
pulls in ``torch._dynamo``). When the four decompressed IDX files of an MNIST-family dataset are all
in place, :func:`_read_idx` reads them directly (the same bytes, so the same tensors as torchvision's
``.data``/``.targets``); anything else (download, ``.gz`` archives, CIFAR, a file that does not parse)
goes through torchvision and its error messages.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from cl_runner.data.datasets import DatasetUnavailable, RawDataset, register

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# dataset name -> (torchvision class name, sub-folder of data_dir, expected files, n_classes, image shape)
SPECS: dict[str, tuple[str, str, tuple[str, ...], int, tuple[int, int, int]]] = {
    "mnist": ("MNIST", os.path.join("MNIST", "raw"), MNIST_FILES, 10, (1, 28, 28)),
    "fashion_mnist": ("FashionMNIST", os.path.join("FashionMNIST", "raw"), MNIST_FILES, 10, (1, 28, 28)),
    "kmnist": ("KMNIST", os.path.join("KMNIST", "raw"), MNIST_FILES, 10, (1, 28, 28)),
    "cifar10": (
        "CIFAR10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
        10,
        (3, 32, 32),
    ),
    "cifar100": ("CIFAR100", "cifar-100-python", ("train", "test", "meta"), 100, (3, 32, 32)),
}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unavailable(name: str, data_dir: str, download: bool, reason: str) -> DatasetUnavailable:
    _, sub, files, _, _ = SPECS[name]
    folder = os.path.join(os.path.abspath(os.path.expanduser(str(data_dir))), sub)
    top = sub.split(os.sep)[0]
    hint = (
        f"download failed: {reason}; copy the files there, or set data_dir= to the folder that holds {top}/"
        if download
        else f"download=false: run with download=true, or set data_dir= to the folder that holds {top}/"
    )
    return DatasetUnavailable(f"{name}: files not found in {folder}; expected {', '.join(files)} ({hint})")


def _open(name: str, data_dir: str, download: bool, train: bool) -> Any:
    """The torchvision dataset object for one split; every failure becomes DatasetUnavailable."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, SPECS[name][0])
    root = os.path.expanduser(str(data_dir))
    try:
        return cls(root=root, train=train, download=bool(download))
    except OSError as e:  # URLError, socket timeouts, read-only data_dir while downloading
        if e.filename and os.path.exists(e.filename):  # the file is there but cannot be read
            reason = (e.strerror or _first_line(e)).lower()
            raise DatasetUnavailable(f"{name}: cannot read {e.filename}: {reason}") from None
        raise _unavailable(name, data_dir, download, _first_line(e)) from None
    except Exception as e:
        reason = _first_line(e).rstrip(":")
        # torchvision: "Dataset not found…" (download=false) or "Error downloading…" (offline)
        if isinstance(e, RuntimeError) and ("not found" in reason or reason.startswith("Error downloading")):
            raise _unavailable(name, data_dir, download, reason) from None
        # anything else while reading: truncated or malformed files (the IDX parser asserts or
        # fails to reshape, pickle raises)
        folder = os.path.join(os.path.abspath(root), SPECS[name][1])
        raise DatasetUnavailable(
            f"{name}: the files in {folder} cannot be read ({type(e).__name__}: {reason}); "
            "delete them and download again"
        ) from None


def _images(data: Any) -> torch.Tensor:
    """uint8 images → float32 (N, C, H, W) in [0, 1]. MNIST: tensor (N, H, W); CIFAR: numpy (N, H, W, C)."""
    x = torch.as_tensor(data)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.to(torch.float32).div_(255.0).contiguous()


def _read_idx(path: str) -> torch.Tensor | None:
    """An uncompressed IDX file of unsigned bytes (the MNIST family's format: a big-endian header of
    magic 0x0000 08 <ndim>, then ndim int32 sizes) as a uint8 tensor; None if it is not exactly that."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        return None
    ndim = raw[3]
    head = 4 + 4 * ndim
    if ndim < 1 or len(raw) < head:
        return None
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != head + math.prod(shape):
        return None
    return torch.frombuffer(bytearray(raw[head:]), dtype=torch.uint8).reshape(shape)


def _load_idx(name: str, data_dir: str) -> list[torch.Tensor] | None:
    """The MNIST family's four decompressed files read without torchvision, or None (use torchvision)."""
    if SPECS[name][2] != MNIST_FILES:
        return None
    folder = os.path.join(os.path.expanduser(str(data_dir)), SPECS[name][1])
    arrays = [_read_idx(os.path.join(folder, f)) for f in MNIST_FILES]
    if any(a is None for a in arrays) or arrays[0].dim() != 3 or arrays[1].dim() != 1:
        return None
    return [_images(arrays[0]), arrays[1].long(), _images(arrays[2]), arrays[3].long()]


def _load(name: str, data_dir: str, download: bool, seed: int) -> RawDataset:
    del seed  # the official train/test split is used; the seed plays no part in loading
    fast = _load_idx(name, data_dir)
    if fast is not None:
        return RawDataset(name, *fast, n_classes=SPECS[name][3])
    splits = []
    for train in (True, False):
        ds = _open(name, data_dir, download, train)
        splits += [_images(ds.data), torch.as_tensor(ds.targets, dtype=torch.long)]
    return RawDataset(name, *splits, n_classes=SPECS[name][3])


def _make_loader(name: str) -> None:
    def loader(data_dir: str, download: bool, seed: int) -> RawDataset:
        return _load(name, data_dir, download, seed)

    loader.__name__ = f"load_{name}"
    loader.__doc__ = f"{SPECS[name][0]} through torchvision (files: <data_dir>/{SPECS[name][1]}/)."
    register(name, shape=SPECS[name][4])(loader)


for _name in SPECS:
    _make_loader(_name)
