"""Experiment presets (configs/experiment/): each composes to the published protocol's values
(checked against a table copied by hand from docs/protocols/), command-line choices still win, and a
shortened version of each (tiny fake MNIST-format files, one step per task) runs end to end.
Also scripts/reproduce.py on the same tiny data. The presets' former names (aliases kept for one
release): tests/test_preset_aliases.py."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf
from test_vision_data import fake_data_dir

ROOT = Path(__file__).resolve().parents[1]
# the presets, without the former names kept as aliases (`# alias of <new name> …`, tests/test_preset_aliases.py)
PRESETS = sorted(
    p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml") if "\n# alias of " not in "\n" + p.read_text()
)
HSU = [f"hsu2018_split_mnist_mlp400_{s}" for s in ("task", "domain", "class")]
VDV = [f"vandeven2019_permuted_mnist_mlp1000_{s}" for s in ("task", "domain", "class")]
EWC_DEMOS = ["ewctutorial_mnist_fashion_mlp256_domain", "ewctradeoff_mnist_fashion_mlp256bn_domain"]
CURVATURE = "curvature_mnist_fashion_kmnist_cnn_class"

# docs/protocols/hsu2018.md#methods, "Strength c per scenario (task / domain / class)"
HSU_STRENGTH = {
    "ewc": (100, 100, 600),
    "online_ewc": (400, 700, 100),
    "si": (300, 3000, 600),
    "l2": (0.01, 0.5, 100),
    "mas": (1, 10000, 1),
}
# docs/protocols/vandeven2019.md#methods, (λ, γ) per scenario
VDV_STRENGTH = {
    "task": {"ewc": 500, "online_ewc": (500, 0.8), "si": 5},
    "domain": {"ewc": 500, "online_ewc": (1000, 0.9), "si": 5},
    "class": {"ewc": 1, "online_ewc": (5, 1.0), "si": 0.1},
}


def compose(*overrides: str):
    with hydra.initialize_config_module("cl_runner.configs", version_base="1.3"):
        return hydra.compose("config", overrides=list(overrides))


def resolved(cfg) -> dict:
    """The composed values, without Hydra's instantiation keys (``_target_``, ``_partial_``)."""
    strip = lambda node: {k: v for k, v in node.items() if not k.startswith("_")} if isinstance(node, dict) else node  # noqa: E731
    return {k: strip(v) for k, v in OmegaConf.to_container(cfg, resolve=True).items()}


def test_all_named_presets_exist():
    assert set(HSU + VDV + EWC_DEMOS + [CURVATURE, "regularizers_rotated_mnist_mlp400_domain"]) <= set(PRESETS)


@pytest.mark.parametrize("preset", HSU)
def test_hsu_presets_match_protocol_a(preset):
    scenario = preset.rsplit("_", 1)[1]
    col = ("task", "domain", "class").index(scenario)
    base = resolved(compose(f"experiment={preset}"))
    assert base["scenario"] == scenario
    assert (base["epochs"], base["iterations"], base["batch_size"], base["reset_optimizer"]) == (4, None, 128, False)
    assert base["optimizer"]["name"] == "adam" and base["optimizer"]["lr"] == 0.001
    b = base["benchmark"]
    assert (b["name"], b["dataset"], b["n_tasks"], b["classes_per_task"]) == ("split_mnist", "mnist", 5, 2)
    assert b["class_order"] == list(range(10)) and b["shuffle_classes"] is False
    assert b["pad"] == 32 and b["normalize"] == {"mean": 0.1, "std": 0.2752}
    assert base["model"]["name"] == "mlp" and base["model"]["hidden"] == [400, 400]
    for method, strengths in HSU_STRENGTH.items():
        cfg = resolved(compose(f"experiment={preset}", f"method={method}"))
        assert cfg["lambda"] == strengths[col], method
        assert cfg["method"]["lambda"] == strengths[col], method
    ewc = resolved(compose(f"experiment={preset}", "method=ewc"))["method"]
    assert (ewc["half"], ewc["fisher_labels"], ewc["fisher_samples"]) == (False, "pred", None)
    oewc = resolved(compose(f"experiment={preset}", "method=online_ewc"))["method"]
    assert (oewc["gamma"], oewc["half"], oewc["fisher_labels"]) == (1.0, False, "pred")
    si = resolved(compose(f"experiment={preset}", "method=si"))["method"]
    assert (si["xi"], si["grad"]) == (0.1, "task")
    mas = resolved(compose(f"experiment={preset}", "method=mas"))["method"]
    assert (mas["per_sample"], mas["mas_batch"]) == (False, 128)
    assert resolved(compose(f"experiment={preset}", "method=joint"))["method"]["mode"] == "all"


def test_hsu_domain_si_shows_protocol_a_row():
    """The values the issue names for `cl-run experiment=hsu2018_split_mnist_mlp400_domain method=si`."""
    cfg = resolved(compose("experiment=hsu2018_split_mnist_mlp400_domain", "method=si"))
    assert cfg["lambda"] == 3000 and cfg["method"] == {
        "name": "si",
        "lambda": 3000,
        "xi": 0.1,
        "grad": "task",
        "clip_grad_value": None,
    }
    assert cfg["benchmark"]["pad"] == 32 and cfg["benchmark"]["normalize"] == {"mean": 0.1, "std": 0.2752}
    assert (cfg["epochs"], cfg["batch_size"], cfg["optimizer"]["name"], cfg["optimizer"]["lr"]) == (
        4,
        128,
        "adam",
        0.001,
    )


def test_command_line_choices_win_over_the_preset():
    # Hsu's plain-SGD baseline: a command-line group choice beats the preset's `override /optimizer`,
    # and the learning rate comes from sgd.yaml (Hsu's 0.01)
    sgd = resolved(compose("experiment=hsu2018_split_mnist_mlp400_domain", "method=finetune", "optimizer=sgd"))
    assert sgd["optimizer"] == {"name": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0}
    cfg = resolved(
        compose(
            "experiment=hsu2018_split_mnist_mlp400_domain",
            "method=si",
            "lambda=5",
            "method.xi=0.5",
            "benchmark.pad=0",
            "epochs=1",
        )
    )
    assert cfg["lambda"] == 5 and cfg["method"]["xi"] == 0.5 and cfg["benchmark"]["pad"] == 0 and cfg["epochs"] == 1


@pytest.mark.parametrize("preset", VDV)
def test_van_de_ven_presets_match_protocol_b(preset):
    scenario = preset.rsplit("_", 1)[1]
    base = resolved(compose(f"experiment={preset}"))
    assert base["scenario"] == scenario
    assert (base["iterations"], base["batch_size"], base["reset_optimizer"]) == (5000, 128, False)
    assert base["optimizer"] == {"name": "adam", "lr": 0.0001, "betas": [0.9, 0.999], "weight_decay": 0.0}
    b = base["benchmark"]
    assert (b["name"], b["kind"], b["n_tasks"], b["permute_first"], b["pad"], b["normalize"]) == (
        "permuted_mnist",
        "permuted",
        10,
        True,
        32,
        None,
    )
    assert base["model"]["hidden"] == [1000, 1000]
    want = VDV_STRENGTH[scenario]
    ewc = resolved(compose(f"experiment={preset}", "method=ewc"))
    assert ewc["lambda"] == want["ewc"] and ewc["method"]["half"] is True and ewc["method"]["fisher_labels"] == "pred"
    oewc = resolved(compose(f"experiment={preset}", "method=online_ewc"))
    assert (oewc["lambda"], oewc["method"]["gamma"]) == want["online_ewc"]
    assert oewc["method"]["gamma_in_penalty"] is True and oewc["method"]["half"] is True
    si = resolved(compose(f"experiment={preset}", "method=si"))
    assert si["lambda"] == want["si"] and si["method"]["xi"] == 0.1
    assert resolved(compose(f"experiment={preset}", "method=joint"))["method"]["mode"] == "cumulative"


def test_mnist_fashion_presets():
    # seeds_mnist_fashion became the EWC tutorial and the EWC trade-off presets;
    # tests/test_seeds_presets.py checks every value of both against docs/protocols/
    cfg = resolved(compose("experiment=ewctutorial_mnist_fashion_mlp256_domain", "method=ewc"))
    assert cfg["scenario"] == "domain" and cfg["benchmark"]["datasets"] == ["mnist", "fashion_mnist"]
    assert cfg["model"]["hidden"] == [256] and cfg["lambda"] == 1000
    bn = resolved(compose("experiment=ewctradeoff_mnist_fashion_mlp256bn_domain", "method=ewc"))
    assert bn["model"]["hidden"] == [256, 128] and bn["model"]["batch_norm"] is True


# ----------------------------------------------------------------------------- shortened runs
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    fake_data_dir(root)
    return root


def preset_methods(preset: str) -> list[str]:
    """finetune and every method the preset has values for (configs/protocol/<preset>/<method>.yaml) whose
    method config exists (the der2020_* presets also hold values for methods added on other branches)."""
    files = sorted(f.stem for f in (ROOT / "configs" / "protocol" / preset).glob("*.yaml"))
    return [m for m in dict.fromkeys(["finetune", *files]) if (ROOT / "configs" / "method" / f"{m}.yaml").is_file()]


SHORT = [
    "iterations=1",
    "benchmark.max_train_per_task=16",
    "benchmark.max_test_per_task=8",
    "device=cpu",
    "download=false",
    "eval_batch_size=64",
]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_shortened(preset, data_dir, tmp_path):
    from cl_runner.run import RunParts, run_experiment

    methods = preset_methods(preset)
    assert len(methods) > 1
    # permuted / rotated MNIST: 3 of the 10 or 20 tasks keep the test short (the composition tests check them)
    many = preset.startswith("vandeven") or preset in ("der2020_perm_mnist", "der2020_rot_mnist")
    fewer = ["benchmark.n_tasks=3"] if many else []
    # the DER table's memory methods take their size and arguments from `buffer` (the others ignore it)
    fewer += ["buffer=200"] if preset.startswith("der2020") else []
    for method in methods:
        cfg = compose(f"experiment={preset}", f"method={method}", f"data_dir={data_dir}", *SHORT, *fewer)
        out = tmp_path / method
        # no TensorBoard pictures (half of a 1-step run's time; tests/test_tb_extras.py reads them)
        result = run_experiment(cfg, out, parts=RunParts(figures=False))
        on_disk = json.loads((out / "metrics.json").read_text())
        assert on_disk["status"] == "ok" and on_disk["method"] == method
        n_tasks = len(on_disk["task_names"])
        # curvature: MNIST, Fashion-MNIST and KMNIST (the fake files in the real format); rotated: 5 angles
        n_of = {
            "hsu2018": 5,
            "vandeven2019": 3,
            "ewctutorial": 2,
            "ewctradeoff": 2,
            "curvature": 3,
            "regularizers": 5,
            "der2020": 3,
        }
        special = {"der2020_seq_mnist": 5}
        assert n_tasks == special.get(preset, n_of[preset.split("_", 1)[0]])
        assert len(on_disk["accuracy_matrix"]) == n_tasks and all(len(r) == n_tasks for r in on_disk["accuracy_matrix"])
        assert on_disk["acc"] == pytest.approx(sum(on_disk["accuracy_matrix"][-1]) / n_tasks)
        assert result["acc"] == on_disk["acc"]
        # the protocol's options reached the method
        expected = {k: v for k, v in resolved(cfg)["method"].items() if k not in ("name", "lambda")}
        assert on_disk["method_options"] == expected


# ----------------------------------------------------------------------------- reproduce.py
def load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reproduce_method_entries():
    rep = load_reproduce()
    assert rep.parse_entry("ewc") == ("ewc", ["method=ewc"])
    assert rep.parse_entry("finetune_sgd") == ("finetune_sgd", ["method=finetune", "optimizer=sgd"])
    assert rep.parse_entry("sgd01:method=finetune optimizer=sgd optimizer.lr=0.1") == (
        "sgd01",
        ["method=finetune", "optimizer=sgd", "optimizer.lr=0.1"],
    )
    for bad in ("", "lambda=3", "x:", "x:notanoverride"):
        with pytest.raises(ValueError):
            rep.parse_entry(bad)


@pytest.mark.slow
def test_reproduce_runs_methods_times_seeds_and_tables_them(data_dir, tmp_path):
    out = tmp_path / "rep"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "reproduce.py"),
        "hsu2018_split_mnist_mlp400_domain",
        "--methods",
        "finetune",
        "finetune_sgd",
        "--seeds",
        "0",
        "1",
        "--out",
        str(out),
        "--",
        f"data_dir={data_dir}",
        *SHORT,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"finetune", "finetune_sgd"}
    for label, optimizer in (("finetune", "adam"), ("finetune_sgd", "sgd")):
        jobs = [
            json.loads(p.read_text())
            for p in sorted((out / "hsu2018_split_mnist_mlp400_domain" / label).rglob("metrics.json"))
        ]
        assert sorted(j["seed"] for j in jobs) == [0, 1]
        assert {j["optimizer"] for j in jobs} == {optimizer} and {j["method"] for j in jobs} == {"finetune"}
        accs = [100 * j["acc"] for j in jobs]
        row = rows[label]
        assert (row["scenario"], row["n_ok"], row["n_failed"]) == ("domain", "2", "0")
        assert float(row["acc_mean"]) == pytest.approx(statistics.fmean(accs), abs=1e-4)
        assert float(row["acc_std"]) == pytest.approx(statistics.stdev(accs), abs=1e-4)
        assert f"| {label} | {statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f} |" in proc.stdout
    assert (out / "results.md").read_text().startswith("| method | hsu2018_split_mnist_mlp400_domain (domain-IL) |")
    # an existing output folder is refused unless --resume, which skips the finished entries
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.slow
def test_curvature_sweep_is_one_table_of_every_row(data_dir, tmp_path):
    """`cl-run -m experiment=curvature_mnist_fashion_kmnist_cnn_class` (shortened, fake MNIST / Fashion-MNIST /
    KMNIST files in the real format) runs every compared method as a row and ends in one summary table."""
    from conftest import cl_run

    sweep = tmp_path / "d3"
    proc = cl_run(
        "-m",
        f"experiment={CURVATURE}",
        f"data_dir={data_dir}",
        "threads=1",
        *SHORT,
        f"hydra.sweep.dir={sweep}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == [
        "finetune",
        "replay",
        *(f"{m}_{k}" for m in ("ewc", "ng_replay") for k in ("diag", "kfac", "dense")),
    ]
    assert [r["method"] for r in rows] == ["finetune", "replay"] + ["ewc"] * 3 + ["ng_replay"] * 3
    assert all(r["status"] == "ok" and r["benchmark"] == "mnist_fellowship" for r in rows)
    for folder in sorted(p for p in sweep.iterdir() if p.is_dir() and "row=" in p.name):
        m = json.loads((folder / "metrics.json").read_text())
        assert m["task_names"] == ["mnist", "fashion_mnist", "kmnist"]
        fisher = m["method_options"].get("fisher")
        assert fisher == (folder.name.rsplit("_", 1)[1] if m["method"] in ("ewc", "ng_replay") else None)
        assert (folder / "curves.csv").is_file()  # eval_every: epoch
