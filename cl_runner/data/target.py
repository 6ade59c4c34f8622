"""A dataset class by ``_target_`` (``benchmark.dataset: {_target_: torchvision.datasets.EMNIST, split:
letters}``): found and checked against its constructor without reading any data (:func:`check_target`),
then read once into tensors like the built-in loaders (:func:`load_target`): its ``.data`` /
``.targets`` when they hold exactly what its items do, else one pass over the items (PIL images or
arrays converted outside the training loop)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch

from cl_runner.data.datasets import DatasetUnavailable, RawDataset, check_labels
from cl_runner.data.vision import first_line

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
                f"{key}={target}: importing {module} failed ({type(e).__name__}: {first_line(e)})"
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
        raise DatasetUnavailable(f"benchmark.dataset: {where} failed: {type(e).__name__}: {first_line(e)}") from None


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
