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

from cl_runner.data.datasets import DatasetUnavailable, RawDataset, check_labels, register

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# dataset name -> (torchvision class name, sub-folder of data_dir, expected files, n_classes, image shape,
# (train, test) sizes)
SPECS: dict[str, tuple[str, str, tuple[str, ...], int, tuple[int, int, int], tuple[int, int]]] = {
    "mnist": ("MNIST", os.path.join("MNIST", "raw"), MNIST_FILES, 10, (1, 28, 28), (60000, 10000)),
    "fashion_mnist": (
        "FashionMNIST",
        os.path.join("FashionMNIST", "raw"),
        MNIST_FILES,
        10,
        (1, 28, 28),
        (60000, 10000),
    ),
    "kmnist": ("KMNIST", os.path.join("KMNIST", "raw"), MNIST_FILES, 10, (1, 28, 28), (60000, 10000)),
    "cifar10": (
        "CIFAR10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
        10,
        (3, 32, 32),
        (50000, 10000),
    ),
    "cifar100": ("CIFAR100", "cifar-100-python", ("train", "test", "meta"), 100, (3, 32, 32), (50000, 10000)),
}


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unavailable(name: str, data_dir: str, download: bool, reason: str) -> DatasetUnavailable:
    _, sub, files = SPECS[name][:3]
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
            reason = (e.strerror or first_line(e)).lower()
            raise DatasetUnavailable(f"{name}: cannot read {e.filename}: {reason}") from None
        raise _unavailable(name, data_dir, download, first_line(e)) from None
    except Exception as e:
        reason = first_line(e).rstrip(":")
        # torchvision: "Dataset not found…" (download=false) or "Error downloading…" (offline)
        if isinstance(e, RuntimeError) and ("not found" in reason or reason.startswith("Error downloading")):
            raise _unavailable(name, data_dir, download, reason) from None
        # anything else while reading: truncated or malformed files (the IDX parser asserts or
        # fails to reshape, pickle raises); an IDX file's own problem is named when it can be
        folder = os.path.join(os.path.abspath(root), SPECS[name][1])
        for path, problem in _idx_problems(name, data_dir):
            raise DatasetUnavailable(
                f"{name}: {path} cannot be read: {problem}; delete it and download again"
            ) from None
        raise DatasetUnavailable(
            f"{name}: the files in {folder} cannot be read ({type(e).__name__}: {reason}); "
            "delete them and download again"
        ) from None


def _images(data: Any) -> torch.Tensor:
    """uint8 images → float32 (N, C, H, W) in [0, 1]. MNIST: tensor (N, H, W); CIFAR: numpy (N, H, W, C)."""
    x = torch.as_tensor(data)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.to(torch.float32).div_(255.0).contiguous()


def _idx_problem(raw: bytes, ndim: int) -> str | None:
    """What is wrong with the bytes of an IDX file of unsigned bytes with ``ndim`` dimensions (the MNIST
    family's format: magic 0x00 0x00 0x08 <ndim>, then ndim big-endian int32 sizes, then the data)."""
    if not raw:
        return "the file is empty"
    if raw[:2] == b"\x1f\x8b":
        return "it is gzip-compressed under the decompressed file's name; decompress it (gunzip)"
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        found = " ".join(f"{b:02x}" for b in raw[:4])
        return (
            f"bad IDX header: magic bytes {found}, expected 00 00 08 {ndim:02x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    head = 4 + 4 * ndim
    if len(raw) < head:
        return f"bad IDX header: {len(raw)} bytes, the header alone needs {head}"
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - head != math.prod(shape):
        return (
            f"its header's sizes {'×'.join(map(str, shape))} need {math.prod(shape)} bytes of data, "
            f"the file holds {len(raw) - head} (truncated or damaged)"
        )
    return None


def _read_idx(path: str, ndim: int) -> torch.Tensor | None:
    """An uncompressed IDX file (:func:`_idx_problem`) as a uint8 tensor; None if it is not exactly that."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if _idx_problem(raw, ndim) is not None:
        return None
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def _idx_problems(name: str, data_dir: str) -> list[tuple[str, str]]:
    """(file, problem) for every decompressed IDX file of an MNIST-family dataset that is malformed."""
    if SPECS[name][2] != MNIST_FILES:
        return []
    folder = os.path.join(os.path.abspath(os.path.expanduser(str(data_dir))), SPECS[name][1])
    out = []
    for f in MNIST_FILES:
        path = os.path.join(folder, f)
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        problem = _idx_problem(raw, 3 if "images" in f else 1)
        if problem:
            out.append((path, problem))
    return out


def _load_idx(name: str, data_dir: str) -> list[torch.Tensor] | None:
    """The MNIST family's four decompressed files read without torchvision, or None (use torchvision).
    Files that parse but do not fit together (counts, image size, labels out of range) are refused."""
    if SPECS[name][2] != MNIST_FILES:
        return None
    folder = os.path.join(os.path.abspath(os.path.expanduser(str(data_dir))), SPECS[name][1])
    paths = [os.path.join(folder, f) for f in MNIST_FILES]
    arrays = [_read_idx(p, 3 if "images" in p else 1) for p in paths]
    if any(a is None for a in arrays):
        return None
    n_classes, shape = SPECS[name][3], SPECS[name][4]
    for images, labels, img_path, lbl_path in ((arrays[0], arrays[1], *paths[:2]), (arrays[2], arrays[3], *paths[2:])):
        if tuple(images.shape[1:]) != shape[1:]:
            size = "×".join(map(str, images.shape[1:]))
            raise DatasetUnavailable(
                f"{name}: {img_path} holds {size} images, {name}'s are {shape[1]}×{shape[2]}; it is not {name}'s file"
            )
        if len(images) != len(labels):
            raise DatasetUnavailable(
                f"{name}: {img_path} holds {len(images)} images but {lbl_path} {len(labels)} labels; "
                "delete them and download again"
            )
        check_labels(labels.long(), n_classes, f"{name}: {lbl_path}")
    return [_images(arrays[0]), arrays[1].long(), _images(arrays[2]), arrays[3].long()]


def _load(name: str, data_dir: str, download: bool, seed: int) -> RawDataset:
    del seed  # the official train/test split is used; the seed plays no part in loading
    fast = _load_idx(name, data_dir)
    if fast is not None:
        return RawDataset(name, *fast, n_classes=SPECS[name][3])
    splits = []
    folder = os.path.join(os.path.abspath(os.path.expanduser(str(data_dir))), SPECS[name][1])
    for train in (True, False):
        ds = _open(name, data_dir, download, train)
        y = torch.as_tensor(ds.targets, dtype=torch.long)
        check_labels(y, SPECS[name][3], f"{name}: {folder} ({'training' if train else 'test'} labels)")
        splits += [_images(ds.data), y]
    return RawDataset(name, *splits, n_classes=SPECS[name][3])


def _make_loader(name: str) -> None:
    def loader(data_dir: str, download: bool, seed: int) -> RawDataset:
        return _load(name, data_dir, download, seed)

    loader.__name__ = f"load_{name}"
    loader.__doc__ = f"{SPECS[name][0]} through torchvision (files: <data_dir>/{SPECS[name][1]}/)."
    register(name, shape=SPECS[name][4], n_classes=SPECS[name][3], sizes=SPECS[name][5])(loader)


for _name in SPECS:
    _make_loader(_name)
