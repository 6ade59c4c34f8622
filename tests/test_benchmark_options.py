"""Benchmark options that cannot silently change the experiment (issue 20 §2, data side): every option
of every benchmark config (configs/benchmark/*.yaml, iterated from the folder) is declared once, and
out-of-range, zero, negative, huge, wrong-type and non-finite values are refused with one line naming
``benchmark.<key>``, before any data file is read; the task stream's memory is checked before
anything is allocated."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cl_runner.data import arrays as A
from cl_runner.data import benchmarks as B
from cl_runner.data import memory as M
from cl_runner.data import target as TG
from cl_runner.data.benchmarks import (
    build_stream,
    check_benchmark,
    check_data,
    check_memory,
    estimate_bytes,
    input_shape,
)
from cl_runner.data.specs import Normalize
from cl_runner.options import Float, Int, ListOf

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "benchmark"
YAMLS = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
nan, inf = math.nan, math.inf

#: values each option must refuse (in every benchmark config that has it); the key-specific ones are
#: valid types whose meaning is out of range for the data (smaller than the images, not a class, …)
BAD: dict[str, list] = {
    "pad": [-2, -1, 10**12, 1e300, 2.5, "abc", nan, inf, True, None, [32], 5, 4000],
    "n_tasks": [0, -1, -5, 10**8, 10**12, 2.5, "abc", nan, inf, True, [2]],
    "classes_per_task": [0, -1, 10**12, 2.5, "abc", nan, True, [2], 1000],
    "class_order": [[0, 0, 1, 2], [-1, 0], [10**12], [2.5], ["a"], "abc", 5, [], [nan], [99_999], [True]],
    "angles": [[], [nan], [inf], [1e300], ["a"], 5, "abc", [400], [-361], None, [True]],
    "angle_range": [[5, 5], [10, 0], [0], [nan, 1], [0, inf], "abc", [0, 400], None, [1, 2, 3], [True, 2]],
    "interpolation": ["cubic", 5, None, "", True],
    "max_train_per_task": [0, -5, 10**12, 2.5, "abc", nan, inf, True, [5]],
    "max_test_per_task": [0, -5, 10**12, 2.5, "abc", nan, inf, True, [5]],
    "normalize": [
        "zzz",
        5,
        [0.5],
        {"mean": 0.1, "std": 0},
        {"mean": 0.1, "std": -1},
        {"mean": nan, "std": 1},
        {"mean": 0.1, "std": inf},
        {"mean": 0.1, "std": 1e-300},
        {"mean": 1e39, "std": 1},
        {"mean": 0.1},
        {"mean": 0.1, "std": 1, "x": 2},
        {"mean": 0.1, "std": [1, 1]},
        {"mean": "a", "std": 1},
    ],
    "scenarios": [[], ["tsk"], ["task", "task"], "task", [1], 5],
    "datasets": [[], ["mnst"], "mnist", [5], None, 5],
    "permute_first": ["yes", 1, None, 2.5],
    "shuffle_classes": ["yes", 1, None, 2.5],
    "name": ["", "a/b", "x" * 101, 5, "../up", "has space"],
    "kind": ["bogus", 5, [1]],
    "dataset": ["mnst", 5, [1], {"root": "x"}, {"_target_": "no_such_module_q.X"}],
    "path": ["x.csv", "", 5, "/nonexistent/folder/file.npz"],
}


@pytest.fixture(scope="module")
def user_file(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("arrays") / "mine.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (40, 1, 6, 6), dtype=np.uint8),
        y_train=np.arange(40) % 4,
        x_test=rng.integers(0, 256, (20, 1, 6, 6), dtype=np.uint8),
        y_test=np.arange(20) % 4,
    )
    return str(path)


def base(name: str, user_file: str) -> dict:
    """The config as shipped; the user-data ones given a file / a dataset class that exists."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    if "path" in cfg:
        cfg["path"] = user_file
    if isinstance(cfg.get("dataset"), dict):
        cfg["dataset"] = {"_target_": "test_arrays.TinyMNIST", "n_classes": 4}
    return cfg


def scenario(cfg: dict) -> str:
    fits = cfg.get("scenarios")
    return fits[0] if isinstance(fits, list) and fits and isinstance(fits[0], str) else "class"


def precheck(cfg: dict, tmp_path: Path) -> None:
    """What cl-run's precheck runs for a benchmark (none of it makes a folder)."""
    check_benchmark(cfg, scenario(cfg))
    input_shape(cfg, str(tmp_path), download=False)
    check_memory(cfg, "cpu")
    source = cfg.get("dataset") if not cfg.get("path") else None
    if cfg.get("path") or isinstance(source, dict):  # the user's data: read and checked (tiny here)
        check_data(cfg, str(tmp_path), download=False, keep=False)


@pytest.mark.parametrize("name", YAMLS)
def test_every_config_passes_as_shipped(name, user_file, tmp_path):
    precheck(base(name, user_file), tmp_path)


def _numeric_or_list_keys(name: str) -> list[str]:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    specs = B.declared_options(cfg.get("kind", "split"))
    keys = []
    for key, value in cfg.items():
        spec = specs[key][0]
        numeric = isinstance(value, (int, float, list, dict)) and not isinstance(value, bool)
        if numeric or isinstance(spec, (Int, Float, ListOf, Normalize)):
            keys.append(key)
    return keys


def test_every_numeric_and_list_option_has_bad_values():
    for name in YAMLS:
        assert set(_numeric_or_list_keys(name)) <= set(BAD), name
        assert all(key in BAD for key in OmegaConf.load(CONFIGS / f"{name}.yaml")), name


CASES = [(name, key) for name in YAMLS for key in OmegaConf.load(CONFIGS / f"{name}.yaml")]


@pytest.mark.parametrize("name,key", CASES, ids=[f"{n}.{k}" for n, k in CASES])
def test_bad_values_are_one_line_naming_the_key(name, key, user_file, tmp_path):
    for value in BAD[key]:
        cfg = {**base(name, user_file), key: value}
        if key == "kind" and isinstance(value, str) and value in B.KINDS:
            continue
        with pytest.raises(ValueError) as e:
            precheck(cfg, tmp_path)
        msg = str(e.value)
        assert "\n" not in msg, msg
        assert f"benchmark.{key}" in msg, f"{name}: {key}={value!r}: {msg}"


def test_check_benchmark_reads_no_file(user_file, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a data file was read")

    monkeypatch.setattr(A, "load", fail)
    monkeypatch.setattr(A, "header", fail)
    monkeypatch.setattr(TG, "load_target", fail)
    monkeypatch.setattr(TG, "target_shape", fail)
    monkeypatch.setattr(B, "load_dataset", fail)
    for name in YAMLS:
        cfg = base(name, user_file)
        check_benchmark(cfg, scenario(cfg))
        with pytest.raises(ValueError):
            check_benchmark({**cfg, "max_train_per_task": 0}, "class")


@pytest.mark.parametrize(
    "name,key,close",
    [
        ("rotated_mnist", "angels", "angles"),
        ("split_mnist", "permute_first", None),  # an option of another kind
        ("permuted_mnist", "n_task", "n_tasks"),
        ("split_digits", "lamda", None),
    ],
)
def test_unknown_keys_are_refused_naming_the_valid_ones(name, key, close, user_file):
    cfg = {**base(name, user_file), key: 1}
    with pytest.raises(ValueError) as e:
        check_benchmark(cfg, "task")
    msg = str(e.value)
    assert msg.startswith(f"unknown key 'benchmark.{key}' in benchmark kind {cfg['kind']}: ")
    assert (f"did you mean 'benchmark.{close}'?" in msg) if close else "it is not an option" in msg
    assert "valid: " in msg and "max_train_per_task" in msg


def test_pad_and_normalize_against_the_images():
    with pytest.raises(
        ValueError, match=r"^benchmark.pad must be 0 \(keep the 28×28 images of mnist\) or a size in \[28, 112\]"
    ):
        check_benchmark(base("split_mnist", "") | {"pad": 20}, "class")
    assert input_shape(base("split_mnist", "") | {"pad": 28}) == (1, 28, 28)
    assert input_shape(base("split_mnist", "") | {"pad": 112}) == (1, 112, 112)
    with pytest.raises(ValueError, match=r"^benchmark.normalize.std must be one value or one per channel \(3 for"):
        check_benchmark(base("split_cifar10", "") | {"normalize": {"mean": 0.5, "std": [0.2, 0.2]}}, "class")
    check_benchmark(
        base("split_cifar10", "") | {"normalize": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}}, "class"
    )
    with pytest.raises(ValueError, match=r"^benchmark.datasets have different image shapes"):
        check_benchmark({"kind": "sequence", "datasets": ["digits", "mnist"]}, "class")


def test_class_split_against_the_dataset():
    cfg = base("split_mnist", "")
    with pytest.raises(
        ValueError, match=r"^benchmark.n_tasks=6 × benchmark.classes_per_task=2 needs 12 classes but mnist has 10"
    ):
        check_benchmark(cfg | {"n_tasks": 6}, "class")
    with pytest.raises(
        ValueError, match=r"^benchmark.class_order holds 10, not a class of mnist \(its classes: 0..9\)"
    ):
        check_benchmark(cfg | {"class_order": [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]}, "class")
    with pytest.raises(ValueError, match=r"^benchmark.class_order must not repeat a value.*\(3 repeated\)"):
        check_benchmark(cfg | {"class_order": [0, 1, 2, 3, 3, 5, 6, 7, 8, 9]}, "class")
    with pytest.raises(
        ValueError, match=r"^benchmark.n_tasks=3 does not cut the 10 classes of benchmark.class_order into equal"
    ):
        check_benchmark(cfg | {"n_tasks": 3, "classes_per_task": None}, "class")
    check_benchmark(cfg | {"n_tasks": 3, "classes_per_task": 3}, "class")  # 9 of the 10 classes: as asked


def test_zero_std_from_auto_normalization_is_refused(tmp_path):
    path = tmp_path / "flat.npz"
    np.savez(path, x_train=np.zeros((8, 3)), y_train=np.arange(8) % 2, x_test=np.zeros((4, 3)), y_test=np.arange(4) % 2)
    cfg = base("arrays", str(path)) | {"normalize": "auto"}
    with pytest.raises(ValueError, match=r"^benchmark.normalize=auto: channel 0 of the training data has std 0\.0"):
        build_stream(cfg, "class", 0, "cpu", ".")


# ----------------------------------------------------------------------------- memory
def _storages(tensors) -> dict[int, int]:
    return {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in tensors}


ROTATED_DIGITS = {"kind": "rotated", "dataset": "digits", "angles": [0, 45, 90]}


@pytest.mark.parametrize(
    "cfg",
    [
        base("permuted_digits", ""),
        base("permuted_digits", "") | {"pad": 16, "normalize": "auto", "max_train_per_task": 100},
        base("split_digits", ""),
        base("split_digits", "") | {"n_tasks": 2, "classes_per_task": 2, "normalize": {"mean": 0.3, "std": 0.2}},
        ROTATED_DIGITS,
        ROTATED_DIGITS | {"pad": 12, "max_test_per_task": 10},
    ],
)
def test_memory_estimate_is_the_streams_peak(cfg, monkeypatch):
    """Every tensor the stream is built from (the data read, their padded copy, the kind's parts, the
    final tasks), each storage counted once: the estimate holds them all, and not much more."""
    seen: list[torch.Tensor] = []
    prepare, kind = B._prepare, cfg["kind"]
    builder = B.KINDS[kind]

    def keep_prepare(raw, size, device):
        out = prepare(raw, size, device)
        seen.extend([raw.x_train, raw.y_train, raw.x_test, raw.y_test, out.x_train, out.x_test])
        return out

    def keep_parts(opts, raws, g):
        parts = builder(opts, raws, g)
        seen.extend(x for p in parts for x in (p.x_train, p.y_train, p.x_test, p.y_test))
        return parts

    monkeypatch.setattr(B, "_prepare", keep_prepare)
    monkeypatch.setitem(B.KINDS, kind, keep_parts)
    stream = build_stream(cfg, "task", 0, "cpu", ".")
    seen.extend(x for t in stream for x in (t.x_train, t.y_train, t.x_test, t.y_test))
    everything = sum(_storages(seen).values())
    assert 0.99 * everything <= estimate_bytes(cfg) <= 1.01 * everything


def test_memory_of_a_file_from_its_header(tmp_path):
    path = tmp_path / "big.npz"
    np.savez(
        path,
        x_train=np.zeros((50, 2, 4, 4), np.uint8),
        y_train=np.zeros(50, int),
        x_test=np.zeros((10, 2, 4, 4), np.uint8),
        y_test=np.zeros(10, int),
    )
    cfg = base("arrays_permuted", str(path)) | {"n_tasks": 3}
    # loaded 60 × (128 + 8) + 3 permuted copies × 60 × 128 + labels of the 3 tasks 3 × 60 × 8
    assert estimate_bytes(cfg) == 60 * 136 + 3 * 60 * 128 + 3 * 60 * 8


def test_a_stream_that_cannot_fit_is_refused_before_anything_is_read(tmp_path):
    cfg = base("permuted_mnist", "") | {"n_tasks": 5000}
    # 5000 tasks × 70,000 images × 3,136 bytes ≈ 1.1 TB
    assert estimate_bytes(cfg) > 1.09e12
    with pytest.raises(ValueError) as e:
        check_memory(cfg, "cpu", available=lambda device: (16 * 10**9, "the machine (MemAvailable)"))
    assert str(e.value).startswith("benchmark.n_tasks=5000: the task stream needs 1.1 TB (5000 tasks of 70000 samples")
    assert "but the machine (MemAvailable) has 16 GB available" in str(e.value)
    cfg = base("permuted_mnist", "") | {"n_tasks": 10_000}  # 2.2 TB: more than this machine has
    with pytest.raises(ValueError, match=r"^benchmark.n_tasks=10000: the task stream needs 2.2 TB"):
        build_stream(cfg, "domain", 0, "cpu", str(tmp_path), download=False)  # no MNIST there: not read
    # the shipped permuted MNIST (10 tasks: 2.2 GB of tasks, 0.2 GB read) fits in 16 GB
    check_memory(base("permuted_mnist", ""), "cpu", available=lambda device: (16 * 10**9, "x"))


def test_rotated_angles_drive_the_memory_message():
    cfg = base("rotated_mnist", "") | {"angles": [i * 0.25 for i in range(1, 1001)]}
    with pytest.raises(ValueError, match=r"^benchmark.angles=\[1000 values\]: the task stream needs 220 GB"):
        check_memory(cfg, "cpu", available=lambda device: (10**9, "the machine"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_is_the_devices_free_memory():
    free, where = M.available_memory("cuda")
    assert free == torch.cuda.mem_get_info()[0] and where.startswith("cuda")
    with pytest.raises(ValueError, match=r"^benchmark.n_tasks=10000: .* but cuda"):
        check_memory(base("permuted_mnist", "") | {"n_tasks": 10_000}, "cuda")
