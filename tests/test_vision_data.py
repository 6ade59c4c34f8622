"""Real-dataset loaders (torchvision) and the benchmarks built on them, on small files that the
tests write in the datasets' own on-disk formats (IDX for the MNIST family, pickled batches for
CIFAR). Nothing here needs /work/shared or the network.

The writers at the top are also used by tests/test_presets.py.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cl_runner.data.benchmarks import build_stream
from cl_runner.data.datasets import DatasetUnavailable, load_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
N_TRAIN, N_TEST = 60, 20  # 6 and 2 images per class


# ----------------------------------------------------------------------------- writers
def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: 0x00 0x00, type 0x08 (unsigned byte), the number of dims, big-endian int32
    sizes, then the raw bytes."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    return header + array.tobytes()


def fake_split(seed: int, n: int, shape: tuple[int, ...], n_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images; every class appears n / n_classes times, in a shuffled order."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    y = rng.permutation(np.arange(n) % n_classes).astype(np.uint8)
    return x, y


def write_mnist_like(root: Path, name: str = "mnist", gz: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """<root>/<Folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]; returns the arrays."""
    raw = Path(root) / MNIST_FOLDERS[name] / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    xtr, ytr = fake_split(seed, N_TRAIN, (28, 28))
    xte, yte = fake_split(seed + 100, N_TEST, (28, 28))
    for stem, arr in (
        ("train-images-idx3-ubyte", xtr),
        ("train-labels-idx1-ubyte", ytr),
        ("t10k-images-idx3-ubyte", xte),
        ("t10k-labels-idx1-ubyte", yte),
    ):
        data = idx_bytes(arr)
        if gz:
            (raw / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (raw / stem).write_bytes(data)
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root: Path, name: str = "cifar10", seed: int = 0) -> dict[str, np.ndarray]:
    """The python-pickle CIFAR layout: rows of 3072 bytes (1024 red, 1024 green, 1024 blue, each
    row-major 32×32). CIFAR-10: data_batch_1..5 + test_batch + batches.meta ('labels');
    CIFAR-100: train + test + meta ('fine_labels')."""
    n_classes = 10 if name == "cifar10" else 100
    per_class_train = 2
    xtr, ytr = fake_split(seed, per_class_train * n_classes, (3072,), n_classes)
    xte, yte = fake_split(seed + 100, n_classes, (3072,), n_classes)
    ytr, yte = ytr.astype(np.int64), yte.astype(np.int64)

    def dump(path: Path, obj) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    if name == "cifar10":
        folder = Path(root) / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        parts = np.array_split(np.arange(len(ytr)), 5)
        for i, idx in enumerate(parts, start=1):
            dump(folder / f"data_batch_{i}", {"data": xtr[idx], "labels": ytr[idx].tolist()})
        dump(folder / "test_batch", {"data": xte, "labels": yte.tolist()})
        dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder = Path(root) / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        dump(folder / "train", {"data": xtr, "fine_labels": ytr.tolist(), "coarse_labels": (ytr // 5).tolist()})
        dump(folder / "test", {"data": xte, "fine_labels": yte.tolist(), "coarse_labels": (yte // 5).tolist()})
        dump(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte, "folder": folder}


def accept_fake_cifar(monkeypatch, folder: Path, name: str = "cifar10") -> None:
    """torchvision checks the CIFAR files against the official MD5 sums; point its lists at the
    sums of the files the test wrote (the reading code stays torchvision's own)."""
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    monkeypatch.setattr(cls, "train_list", [[f, _md5(folder / f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, _md5(folder / f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})


def fake_data_dir(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """MNIST, Fashion-MNIST and KMNIST (different contents) under one data_dir."""
    return {name: write_mnist_like(root, name, seed=i) for i, name in enumerate(MNIST_FOLDERS)}


def bench_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONFIGS / "benchmark" / f"{name}.yaml")
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, fake_data_dir(root)


def as_float(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32) / 255.0


# ----------------------------------------------------------------------------- loaders
@pytest.mark.parametrize("name", list(MNIST_FOLDERS))
def test_mnist_family_reads_idx_files(data, name):
    root, arrays = data
    raw = load_dataset(name, str(root), download=False, seed=0)
    a = arrays[name]
    assert raw.x_train.shape == (N_TRAIN, 1, 28, 28) and raw.x_test.shape == (N_TEST, 1, 28, 28)
    assert raw.x_train.dtype == torch.float32 and raw.y_train.dtype == torch.int64
    assert raw.n_classes == 10
    # exactly the bytes on disk, scaled to [0, 1]
    assert torch.equal(raw.x_train[:, 0], as_float(a["x_train"]))
    assert torch.equal(raw.x_test[:, 0], as_float(a["x_test"]))
    assert raw.y_train.tolist() == a["y_train"].tolist() and raw.y_test.tolist() == a["y_test"].tolist()


def test_gzipped_idx_files_are_extracted_with_download_true(tmp_path, monkeypatch):
    """torchvision keeps MNIST as .gz archives on its mirrors and extracts them into raw/; with
    download=true, .gz files already there (checksums matching) are used without going online."""
    import torchvision.datasets as tvd

    arrays = write_mnist_like(tmp_path, "mnist", gz=True, seed=5)
    raw_dir = tmp_path / "MNIST" / "raw"
    monkeypatch.setattr(tvd.MNIST, "resources", [(f, _md5(raw_dir / f)) for f, _ in tvd.MNIST.resources])
    monkeypatch.setattr(tvd.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # a refused port: never the network
    raw = load_dataset("mnist", str(tmp_path), download=True, seed=0)
    assert torch.equal(raw.x_train[:, 0], as_float(arrays["x_train"]))
    assert raw.y_test.tolist() == arrays["y_test"].tolist()
    assert (raw_dir / "train-images-idx3-ubyte").is_file()  # extracted next to the archive


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_pickled_batches(tmp_path, monkeypatch, name):
    arrays = write_cifar(tmp_path, name)
    accept_fake_cifar(monkeypatch, arrays["folder"], name)
    raw = load_dataset(name, str(tmp_path), download=False, seed=0)
    n_classes = 10 if name == "cifar10" else 100
    assert raw.n_classes == n_classes
    assert raw.x_train.shape == (2 * n_classes, 3, 32, 32) and raw.x_test.shape == (n_classes, 3, 32, 32)
    assert raw.x_train.is_contiguous()
    # row layout: 1024 red, then green, then blue values, each row-major → (C, H, W)
    xtr = arrays["x_train"]
    for n, c, h, w in [(0, 0, 0, 0), (3, 1, 5, 7), (7, 2, 31, 30), (len(xtr) - 1, 2, 16, 0)]:
        assert raw.x_train[n, c, h, w].item() == pytest.approx(xtr[n, c * 1024 + h * 32 + w] / 255.0)
    assert torch.equal(raw.x_test, as_float(arrays["x_test"]).reshape(-1, 3, 32, 32))
    assert raw.y_train.tolist() == arrays["y_train"].tolist()


@pytest.mark.parametrize(
    "name,folder,files",
    [
        ("mnist", "MNIST/raw", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
        ("fashion_mnist", "FashionMNIST/raw", ["train-images-idx3-ubyte"]),
        ("kmnist", "KMNIST/raw", ["t10k-images-idx3-ubyte"]),
        ("cifar10", "cifar-10-batches-py", ["data_batch_1", "data_batch_5", "test_batch", "batches.meta"]),
        ("cifar100", "cifar-100-python", ["train", "test", "meta"]),
    ],
)
def test_missing_files_give_one_line_naming_dataset_folder_and_files(tmp_path, name, folder, files):
    with pytest.raises(DatasetUnavailable) as e:
        load_dataset(name, str(tmp_path), download=False, seed=0)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{name}: files not found in {tmp_path / folder};")
    for f in files:
        assert f in msg
    assert "download=true" in msg and "data_dir" in msg
    assert not (tmp_path / folder).exists()  # download=false writes nothing


def test_failed_download_is_unavailable_not_a_traceback(tmp_path, monkeypatch):
    """Offline with download=true: torchvision's multi-line RuntimeError (MNIST family) or a
    URLError (CIFAR) becomes the same one-line DatasetUnavailable, saying the download failed."""
    import urllib.error

    import torchvision.datasets as tvd

    def mnist_fails(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://x/, got:\nno route\n")

    def cifar_fails(self):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tvd.MNIST, "download", mnist_fails)
    monkeypatch.setattr(tvd.CIFAR10, "download", cifar_fails)
    for name, reason in (("kmnist", "Error downloading train-images-idx3-ubyte.gz"), ("cifar100", "Name or service")):
        with pytest.raises(DatasetUnavailable) as e:
            load_dataset(name, str(tmp_path), download=True, seed=0)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{name}: files not found in ")
        assert "download failed" in msg and reason in msg


def test_truncated_file_is_reported_as_unreadable(tmp_path):
    write_mnist_like(tmp_path, "mnist")
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DatasetUnavailable) as e:
        load_dataset("mnist", str(tmp_path), download=False, seed=0)
    assert str(e.value) == (
        f"mnist: {path} cannot be read: its header's sizes 60×28×28 need 47040 bytes of data, the file holds 984 "
        "(truncated or damaged); delete it and download again"
    )


def _damage(root: Path, stem: str, data: bytes) -> Path:
    path = root / "MNIST" / "raw" / stem
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "stem,make,problem",
    [
        (
            "train-images-idx3-ubyte",
            lambda b: b"\x00\x00\x09\x03" + b[4:],
            "bad IDX header: magic bytes 00 00 09 03, expected 00 00 08 03",
        ),
        (
            "train-labels-idx1-ubyte",
            lambda b: b"\x00\x00\x08\x03" + b[4:],
            "bad IDX header: magic bytes 00 00 08 03, expected 00 00 08 01",
        ),
        ("t10k-images-idx3-ubyte", lambda b: gzip.compress(b), "gzip-compressed under the decompressed file's name"),
        ("t10k-labels-idx1-ubyte", lambda b: b"", "the file is empty"),
        ("t10k-labels-idx1-ubyte", lambda b: b[:6], "bad IDX header: 6 bytes, the header alone needs 8"),
        ("train-labels-idx1-ubyte", lambda b: b + b"\x00", "need 60 bytes of data, the file holds 61"),
    ],
    ids=["images magic", "labels dims", "gzip", "empty", "short header", "extra byte"],
)
def test_damaged_idx_file_is_named_with_what_is_wrong(tmp_path, stem, make, problem):
    write_mnist_like(tmp_path, "mnist")
    path = tmp_path / "MNIST" / "raw" / stem
    _damage(tmp_path, stem, make(path.read_bytes()))
    with pytest.raises(DatasetUnavailable) as e:
        load_dataset("mnist", str(tmp_path), download=False, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"mnist: {path} cannot be read: ") and problem in msg, msg


def test_idx_files_that_do_not_fit_together_are_refused(tmp_path):
    write_mnist_like(tmp_path, "mnist")
    labels = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.arange(59, dtype=np.uint8) % 10))
    with pytest.raises(
        DatasetUnavailable, match=r"train-images-idx3-ubyte holds 60 images but .*train-labels-idx1-ubyte 59 labels"
    ):
        load_dataset("mnist", str(tmp_path), download=False, seed=0)
    images = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    write_mnist_like(tmp_path, "mnist")
    images.write_bytes(idx_bytes(np.zeros((20, 32, 32), np.uint8)))
    with pytest.raises(DatasetUnavailable, match=r"t10k-images-idx3-ubyte holds 32×32 images, mnist's are 28×28"):
        load_dataset("mnist", str(tmp_path), download=False, seed=0)


@pytest.mark.parametrize("benchmark", ["split_mnist", "permuted_mnist"])
def test_labels_out_of_range_are_refused_not_dropped(tmp_path, benchmark):
    """Labels 10 and 200 in MNIST's training labels: split used to drop them silently, permuted to fail
    with a traceback; both refuse, naming the file."""
    arrays = write_mnist_like(tmp_path, "mnist")
    y = arrays["y_train"].copy()
    y[[3, 7]] = [10, 200]
    labels = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(y))
    with pytest.raises(DatasetUnavailable) as e:
        build_stream(bench_cfg(benchmark), "class", 0, "cpu", str(tmp_path), download=False)
    assert str(e.value) == (
        f"mnist: {labels}: 2 labels out of range for 10 classes (0..9): 10, 200; the file is damaged or not this "
        "dataset's"
    )


def test_cifar_labels_out_of_range_are_refused(tmp_path, monkeypatch):
    arrays = write_cifar(tmp_path, "cifar10")
    folder = arrays["folder"]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": arrays["x_test"], "labels": [11] + arrays["y_test"].tolist()[1:]}, f)
    accept_fake_cifar(monkeypatch, folder, "cifar10")
    with pytest.raises(
        DatasetUnavailable,
        match=r"^cifar10: .*cifar-10-batches-py \(test labels\): 1 labels out of range for 10 classes \(0..9\): 11",
    ):
        load_dataset("cifar10", str(tmp_path), download=False, seed=0)


def test_check_data_reads_and_keeps_the_dataset_for_the_run(data, monkeypatch):
    from cl_runner.data import benchmarks as B

    root, _ = data
    calls = []
    real = B.load_dataset
    monkeypatch.setattr(B, "load_dataset", lambda *a: calls.append(a) or real(*a))
    cfg = bench_cfg("split_mnist")
    B.check_data(cfg, str(root), download=False, seed=0)
    s = build_stream(cfg, "class", seed=0, device="cpu", data_dir=str(root), download=False)
    assert len(calls) == 1 and len(s) == 5
    with pytest.raises(DatasetUnavailable, match="^mnist: files not found in"):
        B.check_data(cfg, str(root / "elsewhere"), download=False)


# ----------------------------------------------------------------------------- benchmarks
def test_split_mnist_tasks_hold_exactly_their_classes(data):
    root, arrays = data
    a = arrays["mnist"]
    for scenario in ("task", "domain", "class"):
        s = build_stream(bench_cfg("split_mnist"), scenario, seed=0, device="cpu", data_dir=str(root), download=False)
        assert [t.classes for t in s] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
        assert s.input_shape == (1, 28, 28)
        assert s.n_outputs == {"task": 10, "domain": 2, "class": 10}[scenario]
        for t in s:
            mask = np.isin(a["y_train"], t.classes)
            assert t.n_train == mask.sum() == 12
            # the same images (as multisets: compare sorted sums per image, then exact content)
            got = sorted(t.x_train.reshape(t.n_train, -1).sum(1).tolist())
            want = sorted(as_float(a["x_train"][mask]).reshape(int(mask.sum()), -1).sum(1).tolist())
            assert got == pytest.approx(want)
            # output-unit targets: task-IL 2t + (class mod 2), domain-IL class mod 2, class-IL the class
            labels = torch.as_tensor(a["y_train"][mask].astype(np.int64))
            order = torch.argsort(t.x_train.reshape(t.n_train, -1).sum(1))
            ref_order = torch.argsort(as_float(a["x_train"][mask]).reshape(int(mask.sum()), -1).sum(1))
            expect = {"task": labels % 2 + 2 * t.id, "domain": labels % 2, "class": labels}[scenario]
            assert torch.equal(t.y_train[order], expect[ref_order])
            assert t.units == {"task": (2 * t.id, 2 * t.id + 2), "domain": (0, 2), "class": (0, 2 * t.id + 2)}[scenario]


def test_shuffled_class_order_depends_on_the_seed_only(data):
    root, _ = data
    cfg = bench_cfg("split_mnist", shuffle_classes=True)

    def order(seed):
        s = build_stream(cfg, "class", seed=seed, device="cpu", data_dir=str(root), download=False)
        return [c for t in s for c in t.classes]

    orders = {seed: order(seed) for seed in range(4)}
    assert order(2) == orders[2]
    assert all(sorted(o) == list(range(10)) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) > 1
    assert any(o != list(range(10)) for o in orders.values())


def _column_keys(x: torch.Tensor) -> torch.Tensor:
    """One number per pixel position that identifies its column of values over all images."""
    flat = x.reshape(x.shape[0], -1).double()
    w = torch.linspace(1.0, 2.0, flat.shape[0], dtype=torch.float64) ** 3
    return w @ flat


@pytest.mark.parametrize("permute_first", [True, False])
def test_permuted_tasks_are_one_pixel_permutation_of_the_original(data, permute_first):
    root, arrays = data
    original = as_float(arrays["mnist"]["x_train"]).unsqueeze(1)
    cfg = bench_cfg("permuted_mnist", n_tasks=3, permute_first=permute_first)
    s = build_stream(cfg, "domain", seed=0, device="cpu", data_dir=str(root), download=False)
    assert len(s) == 3 and s.n_outputs == 10
    keys = _column_keys(original)
    for t in s:
        assert torch.equal(t.y_train, torch.as_tensor(arrays["mnist"]["y_train"].astype(np.int64)))
        x = t.x_train
        if t.id == 0 and not permute_first:
            assert torch.equal(x, original)
            continue
        assert not torch.equal(x, original)
        # every pixel position of the task is some pixel position of the original, the same one
        # for all images (random images: each column of values is unique)
        tk = _column_keys(x)
        perm = torch.argsort(keys)[torch.searchsorted(keys.sort().values, tk)]
        assert torch.equal(x.reshape(len(x), -1), original.reshape(len(x), -1)[:, perm])
        assert sorted(perm.tolist()) == list(range(28 * 28))
    assert not torch.equal(s[1].x_train, s[2].x_train)


def test_rotation_by_zero_is_identity_and_by_90_is_a_quarter_turn(data):
    root, arrays = data
    original = as_float(arrays["mnist"]["x_train"]).unsqueeze(1)
    s = build_stream(bench_cfg("rotated_mnist"), "domain", seed=0, device="cpu", data_dir=str(root), download=False)
    assert [t.name for t in s] == [f"mnist-rot{a}" for a in (0, 20, 40, 60, 80)]
    assert torch.equal(s[0].x_train, original)
    assert not torch.allclose(s[1].x_train, original)
    s90 = build_stream(
        bench_cfg("rotated_mnist", angles=[90]), "domain", seed=0, device="cpu", data_dir=str(root), download=False
    )
    # 90° moves every pixel exactly onto another pixel centre: a counter-clockwise quarter turn
    # (torchvision's direction), nothing lost.
    assert torch.allclose(s90[0].x_train, torch.rot90(original, 1, dims=(2, 3)), atol=1e-5)


def test_padding_puts_the_image_in_the_centre(data):
    root, arrays = data
    s = build_stream(
        bench_cfg("split_mnist", n_tasks=1, classes_per_task=10, pad=32),
        "class",
        seed=0,
        device="cpu",
        data_dir=str(root),
        download=False,
    )
    x = s[0].x_test
    assert s.input_shape == (1, 32, 32)
    assert torch.equal(x[:, 0, 2:30, 2:30], as_float(arrays["mnist"]["x_test"]))
    border = x.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.abs().sum() == 0


def test_normalization_given_and_computed(data):
    root, arrays = data
    given = build_stream(
        bench_cfg("split_mnist", pad=32, normalize={"mean": 0.1, "std": 0.2752}),
        "domain",
        seed=0,
        device="cpu",
        data_dir=str(root),
        download=False,
    )
    plain = build_stream(
        bench_cfg("split_mnist", pad=32), "domain", seed=0, device="cpu", data_dir=str(root), download=False
    )
    for a, b in zip(given, plain, strict=True):
        assert torch.allclose(a.x_train, (b.x_train - 0.1) / 0.2752, atol=1e-6)
        assert torch.allclose(a.x_test, (b.x_test - 0.1) / 0.2752, atol=1e-6)
    auto = build_stream(
        bench_cfg("split_mnist", normalize="auto"), "domain", seed=0, device="cpu", data_dir=str(root), download=False
    )
    everything = torch.cat([t.x_train for t in auto])  # the five tasks cover the whole training set
    assert everything.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert everything.std().item() == pytest.approx(1.0, abs=1e-5)


def test_max_per_task_takes_a_seeded_subset(data):
    root, _ = data
    cfg = bench_cfg("split_mnist", max_train_per_task=5, max_test_per_task=3)
    a = build_stream(cfg, "class", seed=1, device="cpu", data_dir=str(root), download=False)
    b = build_stream(cfg, "class", seed=1, device="cpu", data_dir=str(root), download=False)
    assert [t.n_train for t in a] == [5] * 5 and [len(t.y_test) for t in a] == [3] * 5
    assert all(torch.equal(x.x_train, y.x_train) for x, y in zip(a, b, strict=True))
    assert all(set(t.y_train.tolist()) <= set(range(*t.own_units)) for t in a)


def test_mnist_then_fashion_sequence(data):
    root, arrays = data
    s = build_stream(bench_cfg("mnist_fashion"), "class", seed=0, device="cpu", data_dir=str(root), download=False)
    assert [t.name for t in s] == ["mnist", "fashion_mnist"] and s.n_outputs == 20
    assert torch.equal(s[1].x_train[:, 0], as_float(arrays["fashion_mnist"]["x_train"]))
    assert torch.equal(s[1].y_train, torch.as_tensor(arrays["fashion_mnist"]["y_train"].astype(np.int64)) + 10)
    assert s[1].units == (0, 20)
    d = build_stream(bench_cfg("mnist_fashion"), "domain", seed=0, device="cpu", data_dir=str(root), download=False)
    assert d.n_outputs == 10 and d[1].units == (0, 10)


def test_fellowship_refuses_domain_before_reading_any_file(tmp_path, data):
    with pytest.raises(ValueError) as e:
        build_stream(
            bench_cfg("mnist_fellowship"), "domain", seed=0, device="cpu", data_dir=str(tmp_path), download=False
        )  # an empty folder: the refusal must come first
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("scenario=domain does not fit benchmark mnist_fellowship")
    assert msg.endswith("choose one of: task, class")
    root, arrays = data
    s = build_stream(bench_cfg("mnist_fellowship"), "task", seed=0, device="cpu", data_dir=str(root), download=False)
    assert [t.name for t in s] == ["mnist", "fashion_mnist", "kmnist"] and s.n_outputs == 30
    assert s[2].units == (20, 30)
    assert torch.equal(s[2].x_test[:, 0], as_float(arrays["kmnist"]["x_test"]))


def test_every_benchmark_yaml_lists_valid_scenarios():
    for path in sorted((CONFIGS / "benchmark").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        if "scenarios" in cfg:
            assert cfg.scenarios and set(cfg.scenarios) <= {"task", "domain", "class"}, path.name


def test_split_cifar10_and_cifar100(tmp_path, monkeypatch):
    for name in ("cifar10", "cifar100"):
        arrays = write_cifar(tmp_path, name)
        accept_fake_cifar(monkeypatch, arrays["folder"], name)
    s = build_stream(bench_cfg("split_cifar10"), "domain", seed=0, device="cpu", data_dir=str(tmp_path), download=False)
    assert len(s) == 5 and s.input_shape == (3, 32, 32) and s.n_outputs == 2
    assert [t.n_train for t in s] == [4] * 5
    # normalize: auto = per-channel statistics of the training set → each channel has mean 0, std 1
    x = torch.cat([t.x_train for t in s])
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5)
    c100 = build_stream(
        bench_cfg("split_cifar100"), "class", seed=0, device="cpu", data_dir=str(tmp_path), download=False
    )
    assert len(c100) == 10 and c100.n_outputs == 100 and c100[3].classes == list(range(30, 40))
    c20 = build_stream(
        bench_cfg("split_cifar100", n_tasks=20, classes_per_task=5),
        "task",
        seed=0,
        device="cpu",
        data_dir=str(tmp_path),
        download=False,
    )
    assert len(c20) == 20 and c20[19].classes == [95, 96, 97, 98, 99] and c20[19].units == (95, 100)


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("path", sorted((CONFIGS / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_config_builds_and_ends_in_head(path):
    from torch import nn

    from cl_runner.models import build_model

    cfg = OmegaConf.to_container(OmegaConf.load(path))
    shape = (3, 32, 32) if cfg["name"] in ("convnet", "resnet18") else (1, 28, 28)
    model = build_model(cfg, shape, 7)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 7
    assert list(dict(model.named_children()))[-1] == "head"
    model.eval()
    out = model(torch.rand(3, *shape))
    assert out.shape == (3, 7)


def test_convnet_follows_van_de_ven_2022():
    from torch import nn

    from cl_runner.models.cifar import ConvNet

    net = ConvNet((3, 32, 32), 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 256]
    assert [c.stride[0] for c in convs] == [1, 2, 2, 2, 2] and all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 5
    fcs = [m for m in net.body.modules() if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(256 * 2 * 2, 2000), (2000, 2000)]


def test_reduced_resnet18_width():
    from torch import nn

    from cl_runner.models.cifar import ResNet18

    small, full = ResNet18((3, 32, 32), 10, width=20), ResNet18((3, 32, 32), 10, width=64)
    assert small.head.in_features == 160 and full.head.in_features == 512
    assert small.body.conv1.kernel_size == (3, 3) and isinstance(small.body.maxpool, nn.Identity)
    n_small = sum(p.numel() for p in small.parameters())
    assert 1.0e6 < n_small < 1.2e6  # Lopez-Paz & Ranzato's reduced ResNet-18: about 1.1 M parameters
    assert small(torch.rand(2, 3, 32, 32)).shape == (2, 10)


# ----------------------------------------------------------------------------- the command line
@pytest.mark.slow
def test_cl_run_offline_and_missing_gives_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    exe = Path(sys.executable).with_name("cl-run")
    proc = subprocess.run(
        [str(exe), "benchmark=split_mnist", f"data_dir={empty}", "download=false", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        f"error: mnist: files not found in {empty / 'MNIST' / 'raw'}; expected train-images-idx3-ubyte"
    )
    assert not list(empty.iterdir())
