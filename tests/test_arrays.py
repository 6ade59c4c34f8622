"""The user's own data as a benchmark (issue 22 item 3): ``benchmark=arrays`` (and ``arrays_permuted``,
``arrays_rotated``) over an ``.npz`` / ``.pt`` file written here, and ``benchmark=torchvision`` over a
dataset class by ``_target_`` (the tiny classes below, importable as ``test_arrays.<Class>``: no
download, no data on disk). Every bad file is one line naming the file and the key."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cl_runner.data import arrays as A
from cl_runner.data import memory as M
from cl_runner.data.benchmarks import build_stream, check_benchmark, check_data, input_shape
from cl_runner.data.datasets import DatasetUnavailable

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "benchmark"


def bench(name: str, **overrides):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def fake(n_train=40, n_test=20, shape=(1, 6, 6), n_classes=4, seed=0, tasks=None, dtype=np.uint8) -> dict:
    """Random inputs; labels cycle through the classes (every class in both splits); with ``tasks``,
    task ids cycle too (every task in both splits)."""
    rng = np.random.default_rng(seed)

    def inputs(n):
        if dtype == np.uint8:
            return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        return rng.standard_normal(size=(n, *shape)).astype(dtype)

    out = {
        "x_train": inputs(n_train),
        "y_train": np.arange(n_train) % n_classes,
        "x_test": inputs(n_test),
        "y_test": np.arange(n_test) % n_classes,
    }
    if tasks:
        out["t_train"] = (np.arange(n_train) // n_classes) % tasks
        out["t_test"] = (np.arange(n_test) // n_classes) % tasks
    return out


def save(path: Path, data: dict) -> str:
    if path.suffix == ".npz":
        np.savez(path, **data)
    else:
        torch.save({k: torch.as_tensor(v) for k, v in data.items()}, path)
    return str(path)


def scaled(x: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


# ----------------------------------------------------------------------------- good files
@pytest.mark.parametrize("suffix", [".npz", ".pt"])
@pytest.mark.parametrize("shape", [(1, 6, 6), (6, 6), (3, 5, 5), (7,)], ids=["NCHW", "NHW", "RGB", "features"])
def test_split_by_classes_holds_exactly_the_files_samples(tmp_path, suffix, shape):
    data = fake(shape=shape, n_classes=4, dtype=np.uint8 if len(shape) > 1 else np.float64)
    path = save(tmp_path / f"mine{suffix}", data)
    cfg = bench("arrays", path=path)
    want_shape = (1, *shape) if len(shape) == 2 else shape
    assert check_benchmark(cfg, "class") == "split" and input_shape(cfg) == want_shape  # from the header
    s = build_stream(cfg, "class", seed=0, device="cpu", data_dir=".")
    assert s.input_shape == want_shape and len(s) == 2 and s.n_outputs == 4  # 2 classes per task by default
    assert [t.name for t in s] == ["mine[0,1]", "mine[2,3]"]
    x_all = scaled(data["x_train"]).reshape(len(data["y_train"]), *want_shape)
    for t in s:
        mask = np.isin(data["y_train"], t.classes)
        assert torch.equal(t.x_train, x_all[torch.as_tensor(mask)])  # the file's values, in the file's order
        assert t.y_train.tolist() == data["y_train"][mask].tolist()  # class-IL: unit = label here
        assert len(t.y_test) == np.isin(data["y_test"], t.classes).sum()
        assert t.x_train.dtype == torch.float32


def test_class_options_as_split(tmp_path):
    path = save(tmp_path / "d.npz", fake(n_classes=6, n_train=60, n_test=30))
    s = build_stream(
        bench("arrays", path=path, classes_per_task=3, class_order=[5, 4, 3, 2, 1, 0]), "task", 0, "cpu", "."
    )
    assert [t.classes for t in s] == [[5, 4, 3], [2, 1, 0]] and s.n_outputs == 6
    s = build_stream(bench("arrays", path=path, n_tasks=2, classes_per_task=2), "domain", 0, "cpu", ".")
    assert [t.classes for t in s] == [[0, 1], [2, 3]]  # 2 of the 6 classes left out, as asked
    shuffled = [
        [t.classes for t in build_stream(bench("arrays", path=path, shuffle_classes=True), "class", seed, "cpu", ".")]
        for seed in range(3)
    ]
    assert all(sorted(sum(o, [])) == list(range(6)) for o in shuffled) and len({str(o) for o in shuffled}) > 1


def test_labels_with_gaps_make_tasks_of_the_labels_present(tmp_path):
    data = fake(n_classes=4)
    data["y_train"], data["y_test"] = data["y_train"] * 10, data["y_test"] * 10  # labels 0, 10, 20, 30
    path = save(tmp_path / "gaps.npz", data)
    s = build_stream(bench("arrays", path=path), "class", 0, "cpu", ".")
    assert [t.classes for t in s] == [[0, 10], [20, 30]] and s.n_outputs == 4


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_task_ids_make_one_task_each(tmp_path, suffix):
    data = fake(n_train=48, n_test=24, n_classes=4, tasks=3)
    data["y_train"][data["t_train"] == 2] %= 2  # task 2 holds only classes 0 and 1
    data["y_test"][data["t_test"] == 2] %= 2
    path = save(tmp_path / f"tasks{suffix}", data)
    s = build_stream(bench("arrays", path=path), "task", 0, "cpu", ".")
    assert [t.name for t in s] == ["tasks-task0", "tasks-task1", "tasks-task2"]
    assert [t.classes for t in s] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1]]
    assert [t.units for t in s] == [(0, 4), (4, 8), (8, 10)] and s.n_outputs == 10
    for t in s:
        mask = torch.as_tensor(data["t_train"] == t.id)
        assert torch.equal(t.x_train, scaled(data["x_train"])[mask])
        assert t.y_train.tolist() == [t.own_units[0] + c for c in data["y_train"][data["t_train"] == t.id]]
        assert len(t.y_test) == (data["t_test"] == t.id).sum()
    with pytest.raises(ValueError, match="domain-IL needs the same number of classes in every task"):
        build_stream(bench("arrays", path=path), "domain", 0, "cpu", ".")


def test_task_ids_refuse_class_options_and_other_kinds(tmp_path):
    path = save(tmp_path / "ids.npz", fake(tasks=2))
    for key, value in (("classes_per_task", 2), ("n_tasks", 2), ("class_order", [0, 1]), ("shuffle_classes", True)):
        with pytest.raises(ValueError) as e:
            input_shape(bench("arrays", path=path, **{key: value}))  # from the header, before any run
        assert str(e.value).startswith(f"benchmark.{key}=") and "ids.npz brings its own tasks" in str(e.value)
    for kind in ("arrays_permuted", "arrays_rotated"):
        with pytest.raises(ValueError, match=r"^benchmark.kind=(permuted|rotated) makes its tasks from the whole"):
            check_data(bench(kind, path=path), ".", keep=False)


def test_permuted_and_rotated_and_normalized_over_the_file(tmp_path):
    data = fake(n_train=20, n_test=8, shape=(2, 5, 5), n_classes=2)
    path = save(tmp_path / "img.pt", data)
    original = scaled(data["x_train"])
    s = build_stream(bench("arrays_permuted", path=path, n_tasks=3, permute_first=False), "domain", 0, "cpu", ".")
    assert len(s) == 3 and torch.equal(s[0].x_train, original)
    for t in s[1:]:
        # one permutation of the 25 positions, the same for both channels and every image
        flat, ref = t.x_train.reshape(20, 2, 25), original.reshape(20, 2, 25)
        perm = [int((ref == flat[:, :, j : j + 1]).all(0).all(0).nonzero()[0, 0]) for j in range(25)]
        assert sorted(perm) == list(range(25)) and torch.equal(flat, ref[:, :, perm])
    r = build_stream(bench("arrays_rotated", path=path, angles=[0, 90]), "domain", 0, "cpu", ".")
    assert torch.equal(r[0].x_train, original)
    assert torch.allclose(r[1].x_train, torch.rot90(original, 1, dims=(2, 3)), atol=1e-5)
    n = build_stream(bench("arrays", path=path, n_tasks=1, normalize="auto", pad=7), "class", 0, "cpu", ".")
    x = n[0].x_train
    assert x.shape == (20, 2, 7, 7)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(2), atol=1e-5)
    m = build_stream(bench("arrays", path=path, max_train_per_task=3, max_test_per_task=2), "class", 0, "cpu", ".")
    assert [t.n_train for t in m] == [3] and [len(t.y_test) for t in m] == [2]


def test_permuted_feature_vectors(tmp_path):
    data = fake(shape=(9,), dtype=np.float32, n_classes=3, n_train=30, n_test=9)
    path = save(tmp_path / "feat.npz", data)
    s = build_stream(bench("arrays_permuted", path=path, n_tasks=2, normalize="auto"), "domain", 0, "cpu", ".")
    x = torch.as_tensor(data["x_train"])
    x = (x - x.mean()) / x.std()
    for t in s:
        assert t.x_train.shape == (30, 9)
        assert torch.allclose(t.x_train.sort(dim=1).values, x.sort(dim=1).values, atol=1e-6)
    assert not torch.allclose(s[0].x_train, s[1].x_train)
    with pytest.raises(ValueError, match=r"^benchmark.kind=rotated rotates images but feat.npz holds feature vectors"):
        input_shape(bench("arrays_rotated", path=path))
    with pytest.raises(ValueError, match=r"^benchmark.pad=32: feat.npz holds feature vectors"):
        input_shape(bench("arrays", path=path, pad=32))


def test_the_file_is_read_once_for_the_check_and_the_run(tmp_path, monkeypatch):
    path = save(tmp_path / "once.npz", fake())
    reads = []
    load = A.load
    monkeypatch.setattr(A, "load", lambda p: reads.append(p) or load(p))
    cfg = bench("arrays", path=path)
    check_data(cfg, ".")
    a = build_stream(cfg, "class", 0, "cpu", ".")
    assert len(reads) == 1
    b = build_stream(cfg, "class", 0, "cpu", ".")  # taken once: a second stream reads again
    assert len(reads) == 2 and torch.equal(a[1].x_train, b[1].x_train)
    check_data(cfg, ".")
    os.utime(path, ns=(1, 1))  # the file changed since the check: read again
    build_stream(cfg, "class", 0, "cpu", ".")
    assert len(reads) == 4


def test_a_run_on_the_users_file(tmp_path, compose_cfg, one_thread):
    from cl_runner.run import run_experiment

    path = save(tmp_path / "run.npz", fake(shape=(4, 4), n_classes=4))
    cfg = compose_cfg("benchmark=arrays", f"benchmark.path={path}", "benchmark.name=mine", "epochs=1", "threads=1")
    m = run_experiment(cfg, tmp_path / "out")
    assert m["status"] == "ok" and m["benchmark"] == "mine" and len(m["accuracy_matrix"]) == 2


def test_a_run_on_a_dataset_class_from_the_command_line(tmp_path, compose_cfg, one_thread):
    from cl_runner.run import run_experiment

    cfg = compose_cfg(
        "benchmark=torchvision",
        "benchmark.dataset._target_=test_arrays.TinyMNIST",
        "+benchmark.dataset.n_classes=4",
        "benchmark.name=tiny",
        f"data_dir={tmp_path}",
        "model=cnn",
        "benchmark.pad=16",
        "epochs=1",
        "threads=1",
    )
    m = run_experiment(cfg, tmp_path / "out")
    assert m["status"] == "ok" and m["benchmark"] == "tiny" and len(m["accuracy_matrix"]) == 2


# ----------------------------------------------------------------------------- bad files
class Payload:
    """Unpickling this calls os.system: a .pt data file must never get that far."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _with(**changes):
    def make(tmp_path: Path, suffix: str) -> str:
        data = {**fake(), **changes}
        return save(tmp_path / f"bad{suffix}", {k: v for k, v in data.items() if v is not None})

    return make


def _raw_file(content: bytes):
    def make(tmp_path: Path, suffix: str) -> str:
        p = tmp_path / f"bad{suffix}"
        p.write_bytes(content)
        return str(p)

    return make


def _truncated(tmp_path: Path, suffix: str) -> str:
    p = Path(save(tmp_path / f"bad{suffix}", fake(n_train=400)))
    p.write_bytes(p.read_bytes()[:3000])
    return str(p)


def _object_array(tmp_path: Path, suffix: str) -> str:
    data = fake()
    data["y_train"] = np.array([Payload(str(tmp_path / "ran"))] * 40, dtype=object)
    if suffix == ".npz":
        np.savez(tmp_path / "bad.npz", **data)
    else:
        torch.save(
            {**{k: torch.as_tensor(v) for k, v in fake().items()}, "y_train": data["y_train"]}, tmp_path / "bad.pt"
        )
    return str(tmp_path / f"bad{suffix}")


def _pt_list(tmp_path: Path, suffix: str) -> str:
    p = tmp_path / "bad.pt"
    torch.save([torch.zeros(3)], p)
    return str(p)


BAD_FILES = [
    # (id, maker, key named, words in the message, suffixes)
    ("missing y_test", _with(y_test=None), "y_test", "is missing", (".npz", ".pt")),
    (
        "no arrays at all",
        lambda t, s: save(t / f"bad{s}", {"a": np.zeros(3)}),
        "x_train",
        "is missing",
        (".npz", ".pt"),
    ),
    ("x and y lengths", _with(y_train=np.arange(39) % 4), "y_train", "shape mismatch", (".npz", ".pt")),
    ("train and test shapes", _with(x_test=np.zeros((20, 1, 5, 5), np.uint8)), "x_test", "shape mismatch", (".npz",)),
    ("five dims", _with(x_train=np.zeros((40, 1, 1, 6, 6), np.uint8)), "x_train", "has shape", (".npz", ".pt")),
    ("one dim", _with(x_train=np.zeros(40)), "x_train", "has shape", (".npz",)),
    ("empty", _with(x_train=np.zeros((0, 6, 6), np.uint8), y_train=np.zeros(0, int)), "x_train", "empty", (".npz",)),
    (
        "float labels",
        _with(y_train=(np.arange(40) % 4).astype(np.float32)),
        "y_train",
        "must be integers",
        (".npz", ".pt"),
    ),
    ("bool labels", _with(y_train=np.arange(40) % 2 == 0), "y_train", "must be integers", (".npz",)),
    ("string inputs", _with(x_train=np.array([["a"] * 6] * 40)), "x_train", "inputs must be numbers", (".npz",)),
    ("negative labels", _with(y_train=np.arange(40) % 4 - 1), "y_train", "out of range", (".npz", ".pt")),
    ("huge labels", _with(y_train=np.full(40, 10**12)), "y_train", "out of range", (".npz",)),
    ("untrained test labels", _with(y_test=np.arange(20) % 5), "y_test", "y_train does not: 4", (".npz", ".pt")),
    ("nan inputs", _with(x_test=np.full((20, 1, 6, 6), np.nan, np.float32)), "x_test", "non-finite", (".npz", ".pt")),
    (
        "inf inputs",
        _with(x_train=np.full((40, 6), np.inf), x_test=np.zeros((20, 6))),
        "x_train",
        "non-finite",
        (".npz",),
    ),
    (
        "beyond float32",
        _with(x_train=np.full((40, 6), 1e39), x_test=np.zeros((20, 6))),
        "x_train",
        "non-finite",
        (".npz", ".pt"),
    ),
    ("task ids: one of two", _with(t_train=np.zeros(40, int)), "t_test", "both t_train and t_test", (".npz", ".pt")),
    (
        "task ids with a gap",
        _with(t_train=(np.arange(40) % 2) * 2, t_test=(np.arange(20) % 2) * 2),
        "t_train",
        "has no task 1",
        (".npz", ".pt"),
    ),
    (
        "task without test",
        _with(t_train=np.arange(40) % 2, t_test=np.zeros(20, int)),
        "t_test",
        "no samples of task 1",
        (".npz",),
    ),
    (
        "unknown test task",
        _with(t_train=np.zeros(40, int), t_test=np.arange(20) % 2),
        "t_test",
        "t_train does not",
        (".npz",),
    ),
    (
        "negative task ids",
        _with(t_train=np.arange(40) % 2 - 1, t_test=np.zeros(20, int)),
        "t_train",
        "out of range",
        (".npz",),
    ),
    ("float task ids", _with(t_train=np.zeros(40), t_test=np.zeros(20)), "t_train", "must be integers", (".npz",)),
    (
        "task's test labels",
        _with(t_train=(np.arange(40) % 4 >= 2).astype(int), t_test=(np.arange(20) % 4 == 3).astype(int)),
        "y_test",
        "labels of task 0 that y_train of task 0 does not: 2",
        (".npz",),
    ),
    ("not a zip", _raw_file(b"x_train,y_train\n1,2\n"), "", "not an .npz file", (".npz",)),
    ("not torch", _raw_file(b"x_train,y_train\n1,2\n"), "", "not a file written by torch.save", (".pt",)),
    ("a list", _pt_list, "", "holds a list, not a dict of tensors", (".pt",)),
    ("truncated", _truncated, "", "", (".npz", ".pt")),
    ("pickled objects", _object_array, "", "", (".npz", ".pt")),
]


def _cases():
    for case in BAD_FILES:
        for suffix in case[4]:
            yield pytest.param(*case[1:4], suffix, id=f"{case[0]}{suffix}")


@pytest.mark.parametrize("make,key,words,suffix", list(_cases()))
def test_a_bad_file_is_one_line_naming_file_and_key(tmp_path, make, key, words, suffix):
    path = make(tmp_path, suffix)
    with pytest.raises((ValueError, DatasetUnavailable)) as e:
        check_data(bench("arrays", path=path), ".", keep=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"benchmark.path={path}: "), msg
    assert f"key '{key}'" in msg if key else True, msg
    assert words in msg, msg
    assert not (tmp_path / "ran").exists()  # nothing in the file ran


def test_structure_errors_are_found_from_the_header_alone(tmp_path, monkeypatch):
    """What the header shows is refused by input_shape (cl-run's precheck) without reading the arrays."""
    monkeypatch.setattr(A, "_read_npz", lambda *a: pytest.fail("the arrays were read"))
    for make in (_with(y_train=np.arange(39) % 4), _with(y_test=None)):
        path = make(tmp_path, ".npz")
        with pytest.raises(ValueError, match=rf"^benchmark.path={path}: key 'y_t"):
            input_shape(bench("arrays", path=path))
    ok = save(tmp_path / "ok.npz", fake(shape=(3, 8, 8)))
    assert input_shape(bench("arrays", path=ok, pad=12)) == (3, 12, 12)


def test_pt_file_is_read_without_running_code(tmp_path):
    marker = tmp_path / "ran"
    payload = tmp_path / "evil.pt"
    torch.save({**{k: torch.as_tensor(v) for k, v in fake().items()}, "x_train": Payload(str(marker))}, payload)
    with pytest.raises(ValueError) as e:
        input_shape(bench("arrays", path=str(payload)))
    assert "weights_only" in str(e.value) and str(e.value).startswith(f"benchmark.path={payload}: ")
    assert not marker.exists()


@pytest.mark.parametrize(
    "path,words",
    [("missing.npz", "no such file"), ("data.csv", "must be the path of an .npz file"), ("", "must be the path")],
)
def test_path_that_cannot_be_a_data_file(tmp_path, path, words):
    full = str(tmp_path / path) if path else path
    with pytest.raises(ValueError) as e:
        check_benchmark(bench("arrays", path=full), "class")
    assert str(e.value).startswith("benchmark.path") and words in str(e.value)


def test_path_is_required_and_alone(tmp_path):
    with pytest.raises(ValueError, match=r"^benchmark.path must be the path of an .npz or .pt file.*got None"):
        check_benchmark(bench("arrays"), "class")
    path = save(tmp_path / "d.npz", fake())
    with pytest.raises(ValueError, match=r"^benchmark.path and benchmark.dataset are both set"):
        check_benchmark(bench("arrays", path=path, dataset="mnist"), "class")


def test_labels_not_cut_evenly_are_refused_with_the_key(tmp_path):
    path = save(tmp_path / "odd.npz", fake(n_classes=5, n_train=50, n_test=25))
    with pytest.raises(ValueError) as e:
        check_data(bench("arrays", path=path), ".", keep=False)
    assert str(e.value).startswith("benchmark.classes_per_task=null (2 classes per task) does not cut the 5 classes")
    with pytest.raises(ValueError, match=r"^benchmark.class_order holds 7, not a class of odd.npz"):
        check_data(bench("arrays", path=path, class_order=[0, 7]), ".", keep=False)
    s = build_stream(bench("arrays", path=path, n_tasks=2, classes_per_task=2), "class", 0, "cpu", ".")
    assert [t.classes for t in s] == [[0, 1], [2, 3]]


# ----------------------------------------------------------------------------- a dataset class by _target_
N_CLASSES = 5


def _images(train: bool, n: int = 20, size: int = 7, channels: int = 1, n_classes: int = N_CLASSES):
    rng = np.random.default_rng(1 if train else 2)
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8), [i % n_classes for i in range(n)]


class TinyMNIST:
    """torchvision's MNIST interface: .data uint8 (N, H, W), .targets, .classes, items (PIL image, int)."""

    def __init__(self, root, train=True, transform=None, target_transform=None, download=False, size=7, n_classes=5):
        x, y = _images(train, size=size, n_classes=n_classes)
        self.data, self.targets, self.root = torch.as_tensor(x), torch.as_tensor(y), root
        self.classes = [f"c{i}" for i in range(n_classes)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return Image.fromarray(self.data[i].numpy(), mode="L"), int(self.targets[i])


class TinySVHN:
    """split='train'/'test' instead of train=, no .data: one pass over RGB PIL items."""

    def __init__(self, root, split="train", download=False):
        self.x, self.y = _images(split == "train", channels=3)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return Image.fromarray(self.x[i], mode="RGB"), self.y[i]


class NeedsArg(TinyMNIST):
    def __init__(self, root, level, **kwargs):
        super().__init__(root, **kwargs)


class BadLabels(TinyMNIST):
    def __init__(self, root, train=True, download=False):
        super().__init__(root, train)
        self.targets = self.targets + 3  # labels up to 7 with 5 classes


def _tv(target: str, **more):
    return bench("torchvision", dataset={"_target_": f"test_arrays.{target}", **more})


def test_dataset_class_by_target_read_once_into_tensors(tmp_path):
    cfg = _tv("TinyMNIST", size=9)
    assert input_shape(cfg, str(tmp_path)) == (1, 9, 9)
    s = build_stream(
        bench("torchvision", dataset={"_target_": "test_arrays.TinyMNIST", "size": 9}, n_tasks=2, classes_per_task=2),
        "task",
        0,
        "cpu",
        str(tmp_path),
    )
    x, y = _images(True, size=9)
    assert [t.classes for t in s] == [[0, 1], [2, 3]] and s.input_shape == (1, 9, 9)
    mask = np.isin(y, [2, 3])
    assert torch.equal(s[1].x_train[:, 0], torch.as_tensor(x[mask]).float() / 255)
    assert s.info["datasets"] == ["test_arrays.TinyMNIST"]


def test_dataset_class_without_data_attribute_and_with_split_argument(tmp_path):
    cfg = bench("torchvision", dataset={"_target_": "test_arrays.TinySVHN"}, n_tasks=1, classes_per_task=5)
    assert input_shape(cfg, str(tmp_path)) == (3, 7, 7)
    s = build_stream(cfg, "class", 0, "cpu", str(tmp_path))
    x, _ = _images(False, channels=3)
    assert torch.equal(s[0].x_test, torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255)  # (C, H, W), [0, 1]


@pytest.mark.parametrize(
    "dataset,words",
    [
        ({"_target_": "test_arrays.Nope"}, "cannot be imported: test_arrays has no attribute 'Nope'"),
        ({"_target_": "no_such_module_xyz.Data"}, "cannot be imported: no module named 'no_such_module_xyz'"),
        ({"_target_": None}, "benchmark.dataset._target_ must name a dataset class"),
        ({"_target_": "test_arrays.TinyMNIST", "sise": 3}, "unknown key 'benchmark.dataset.sise'"),
        ({"_target_": "test_arrays.TinyMNIST", "train": False}, "benchmark.dataset.train is set by cl-runner"),
        ({"_target_": "test_arrays.TinyMNIST", "transform": "x"}, "benchmark.dataset.transform: per-sample transforms"),
        ({"_target_": "test_arrays.NeedsArg"}, "benchmark.dataset.level is required"),
        ({"_target_": "test_arrays.N_CLASSES"}, "is a int, not a dataset class"),
    ],
)
def test_bad_dataset_class_is_refused_before_reading(dataset, words):
    with pytest.raises(ValueError) as e:
        check_benchmark(bench("torchvision", dataset=dataset), "class")
    assert "\n" not in str(e.value) and words in str(e.value) and "benchmark.dataset" in str(e.value)


def test_dataset_class_with_labels_out_of_range_is_refused(tmp_path):
    with pytest.raises(DatasetUnavailable, match=r"test_arrays.BadLabels.*labels out of range for 5 classes"):
        check_data(
            _tv(
                "BadLabels",
            ),
            str(tmp_path),
            keep=False,
        )


def test_memory_of_a_dataset_class_is_checked_once_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "available_memory", lambda device: (1000, "the machine (MemAvailable)"))
    with pytest.raises(ValueError, match=r"the task stream needs .* but the machine \(MemAvailable\) has 1 kB"):
        build_stream(
            bench("torchvision", dataset={"_target_": "test_arrays.TinyMNIST"}, n_tasks=1),
            "class",
            0,
            "cpu",
            str(tmp_path),
        )
