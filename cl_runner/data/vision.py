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

import inspect
import math
import os
from collections.abc import Mapping
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


def _first_line(e: BaseException) -> str:
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
            reason = (e.strerror or _first_line(e)).lower()
            raise DatasetUnavailable(f"{name}: cannot read {e.filename}: {reason}") from None
        raise _unavailable(name, data_dir, download, _first_line(e)) from None
    except Exception as e:
        reason = _first_line(e).rstrip(":")
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


# ----------------------------------------------------------------------------- any dataset class
#: constructor arguments cl-runner sets itself (the split, and where the files are)
_SET_HERE = ("root", "train", "download")
#: per-sample transforms are not applied: the dataset is read once into tensors
_NO_TRANSFORMS = ("transform", "target_transform", "transforms")


def locate(target: Any, key: str = "benchmark.dataset._target_") -> Any:
    """The class (or callable) a dotted ``_target_`` names; ValueError naming the key, the module and
    Python's error otherwise."""
    import importlib

    if not isinstance(target, str) or "." not in target.strip(". "):
        raise ValueError(
            f"{key} must name a dataset class as module.Class (e.g. torchvision.datasets.EMNIST), got {target!r}"
        )
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest importable module, then attributes
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and not module.startswith(e.name):  # the module exists; something it imports does not
                raise ValueError(f"{key}={target}: importing {module} failed (ModuleNotFoundError: {e})") from None
            continue
        except Exception as e:
            raise ValueError(
                f"{key}={target}: importing {module} failed ({type(e).__name__}: {_first_line(e)})"
            ) from None
        for name in parts[i:]:
            if not hasattr(obj, name):
                raise ValueError(
                    f"{key}={target} cannot be imported: {getattr(obj, '__name__', obj)} has no attribute {name!r}"
                )
            obj = getattr(obj, name)
        if not callable(obj):
            raise ValueError(f"{key}={target} is a {type(obj).__name__}, not a dataset class")
        return obj
    raise ValueError(f"{key}={target} cannot be imported: no module named {parts[0]!r}")


def _parameters(cls: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """The named constructor parameters of ``cls`` (following ``**kwargs`` to its base classes, as
    torchvision's EMNIST passes ``train`` on to MNIST), and whether it takes any keyword at all."""
    params: dict[str, inspect.Parameter] = {}
    classes = cls.__mro__ if isinstance(cls, type) else [cls]
    for c in classes:
        fn = c.__init__ if isinstance(cls, type) else c
        if fn is object.__init__:
            break
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return params, True
        more = False
        for p in sig.parameters.values():
            if p.name == "self" or p.kind == p.VAR_POSITIONAL:
                continue
            if p.kind == p.VAR_KEYWORD:
                more = True
                continue
            params.setdefault(p.name, p)
        if not more:
            return params, False
    return params, True


def _split_argument(cls: Any, params: Mapping[str, Any]) -> str:
    if "train" in params:
        return "train"
    if "split" in params:
        return "split"
    raise ValueError(
        f"benchmark.dataset._target_={_qualname(cls)} takes neither train= nor split=: cl-runner cannot tell its "
        "training set from its test set"
    )


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


def check_target(spec: Mapping[str, Any]) -> Any:
    """A ``benchmark.dataset: {_target_: <class>, <its arguments>}``: the class imports, every argument is
    one its constructor takes, none that cl-runner sets itself, and every required one is given.
    Returns the class; ValueError naming ``benchmark.dataset.<key>`` otherwise. Reads no data."""
    cls = locate(spec.get("_target_"))
    params, open_ended = _parameters(cls)
    split = _split_argument(cls, params)
    given = {k for k in spec if k != "_target_"}
    valid = sorted(k for k in params if k not in _SET_HERE + _NO_TRANSFORMS + (split,))
    for k in sorted(given):
        if k in _NO_TRANSFORMS:
            raise ValueError(
                f"benchmark.dataset.{k}: per-sample transforms are not applied (the dataset is read once into "
                "tensors); use benchmark.pad, benchmark.normalize or the benchmark kind's transforms"
            )
        if k in _SET_HERE or k == split:
            raise ValueError(
                f"benchmark.dataset.{k} is set by cl-runner (root=data_dir, download=download, {split}= for each "
                "split); remove it"
            )
        if k.startswith("_"):
            raise ValueError(f"benchmark.dataset.{k}: only _target_ and the class's own arguments are read")
        if k not in params and not open_ended:
            raise ValueError(
                f"unknown key 'benchmark.dataset.{k}': {_qualname(cls)} takes no argument {k} "
                f"(valid: {', '.join(valid) or 'none'})"
            )
    for name, p in params.items():
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            if name not in given and name not in ("root", split):
                raise ValueError(
                    f"benchmark.dataset.{name} is required by {_qualname(cls)}; add +benchmark.dataset.{name}=…"
                )
    return cls


def _construct(spec: Mapping[str, Any], data_dir: str, download: bool, train: bool) -> Any:
    cls = check_target(spec)
    params, _ = _parameters(cls)
    split = _split_argument(cls, params)
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    kwargs[split] = train if split == "train" else ("train" if train else "test")
    if "root" in params:
        kwargs["root"] = os.path.expanduser(str(data_dir))
    if "download" in params:
        kwargs["download"] = bool(download)
    try:
        return cls(**kwargs)
    except Exception as e:
        where = f"{_qualname(cls)}({'train' if train else 'test'} split, root={kwargs.get('root', '?')})"
        raise DatasetUnavailable(f"benchmark.dataset: {where} failed: {type(e).__name__}: {_first_line(e)}") from None


def _sample(item: Any) -> torch.Tensor:
    """One input as a tensor (C, H, W) or (D,): PIL images through pil_to_tensor, arrays as they are."""
    if hasattr(item, "getbands"):  # a PIL image
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(item)
    x = torch.as_tensor(item)
    return x.unsqueeze(0) if x.dim() == 2 else x


def _scaled(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)


def _labels(ds: Any) -> torch.Tensor | None:
    for attr in ("targets", "labels"):
        y = getattr(ds, attr, None)
        if y is not None:
            try:
                return torch.as_tensor(y).long().reshape(-1)
            except Exception:
                return None
    return None


def _read_split(ds: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as (float32 inputs, int64 labels): from ``.data``/``.targets`` when they hold
    exactly what the dataset's items are (checked on the first item), else one pass over the items."""
    n = len(ds)
    if n == 0:
        raise DatasetUnavailable(f"{where}: the dataset is empty")
    first_x, _ = ds[0]
    first = _sample(first_x)
    data, y = getattr(ds, "data", None), _labels(ds)
    if data is not None and y is not None and len(y) == n:
        try:
            x = torch.as_tensor(data) if not isinstance(data, torch.Tensor) else data
        except Exception:
            x = None
        if x is not None and len(x) == n:
            candidates = [x]
            if x.dim() == first.dim() and x.dim() == 3:
                candidates.append(x.unsqueeze(1))  # (N, H, W) → (N, 1, H, W)
            if x.dim() == 4:
                candidates.append(x.permute(0, 3, 1, 2))  # (N, H, W, C) → (N, C, H, W)
            for c in candidates:
                if tuple(c.shape[1:]) == tuple(first.shape) and c.dtype == first.dtype and torch.equal(c[0], first):
                    return _scaled(c).contiguous(), y
    xs, ys = [], []
    for i in range(n):
        xi, yi = ds[i]
        xs.append(_sample(xi))
        ys.append(int(yi))
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise DatasetUnavailable(f"{where}: its samples have different shapes ({sorted(shapes)[:3]}…)")
    return _scaled(torch.stack(xs)).contiguous(), torch.as_tensor(ys, dtype=torch.long)


def target_shape(spec: Mapping[str, Any], data_dir: str, download: bool) -> tuple[int, ...]:
    """One sample's shape (C, H, W) or (D,), from the first item of the test split (the dataset object
    is built, which reads its files: the cost of knowing the shape of an arbitrary class)."""
    ds = _construct(spec, data_dir, download, train=False)
    if len(ds) == 0:
        raise DatasetUnavailable(f"benchmark.dataset: {_qualname(type(ds))}'s test split is empty")
    return tuple(_sample(ds[0][0]).shape)


def load_target(spec: Mapping[str, Any], data_dir: str, download: bool) -> RawDataset:
    """A dataset class by ``_target_`` (both splits) read once into tensors. Classes: ``len(.classes)`` when
    the dataset has that list, else the largest training label + 1; labels outside it are refused."""
    splits = []
    n_classes = None
    for train in (True, False):
        ds = _construct(spec, data_dir, download, train)
        where = f"benchmark.dataset: {_qualname(type(ds))} ({'training' if train else 'test'} split)"
        x, y = _read_split(ds, where)
        if not torch.isfinite(x).all():
            raise DatasetUnavailable(f"{where}: non-finite input values")
        if n_classes is None:
            classes = getattr(ds, "classes", None)
            n_classes = len(classes) if isinstance(classes, (list, tuple)) and classes else int(y.max()) + 1
        check_labels(y, n_classes, where)
        splits += [x, y]
    if splits[0].shape[1:] != splits[2].shape[1:]:
        raise DatasetUnavailable(
            f"benchmark.dataset: the training samples are {tuple(splits[0].shape[1:])}, the test samples "
            f"{tuple(splits[2].shape[1:])}"
        )
    cls = locate(spec.get("_target_"))
    return RawDataset(cls.__name__.lower(), *splits, n_classes=n_classes, source=_qualname(cls))
