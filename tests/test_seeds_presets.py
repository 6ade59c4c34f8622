"""The demonstrations' presets (docs/protocols/ewctutorial.md, ewctradeoff.md, curvature.md,
regularizers.md): every value checked against a table copied by hand from those pages, and the EWC
each preset builds uses the protocol's estimator."""

from __future__ import annotations

import hydra
import pytest
from omegaconf import OmegaConf

from cl_runner.methods import build_method

# docs/protocols/ewctutorial.md (D1) / ewctradeoff.md (D2)
D1 = {
    "model": ([256], False),
    "optimizer": ("sgd", 0.001, 0.0),
    "batch_size": 32,
    "epochs": 25,
    "ewc": {
        "lambda": 1000,
        "half": False,
        "fisher_estimator": "per_sample",
        "fisher_labels": "pred",
        "fisher_samples": 512,
    },
}
D2 = {
    "model": ([256, 128], True),
    "optimizer": ("adam", 0.0001, None),
    "batch_size": 100,
    "epochs": 4,
    "ewc": {
        "half": True,
        "fisher_estimator": "batch_label_cross_mean_sq_grad",  # the notebook's (corrected D2, 2026-12-02)
        "fisher_labels": "true",
        "sq_grad_batch_size": 100,
        "sq_grad_batches": 2,
        "fisher_samples": None,
    },
}


def compose(*overrides: str) -> dict:
    with hydra.initialize_config_module("cl_runner.configs", version_base="1.3"):
        return OmegaConf.to_container(hydra.compose("config", overrides=list(overrides)), resolve=True)


TUTORIAL, TRADEOFF = "ewctutorial_mnist_fashion_mlp256_domain", "ewctradeoff_mnist_fashion_mlp256bn_domain"
CURVATURE = "curvature_mnist_fashion_kmnist_cnn_class"


@pytest.mark.parametrize("preset, want", [(TUTORIAL, D1), (TRADEOFF, D2)])
@pytest.mark.parametrize("method", ["finetune", "ewc"])
def test_ewc_demo_presets_follow_their_protocols(preset, want, method):
    cfg = compose(f"experiment={preset}", f"method={method}")
    b = cfg["benchmark"]
    assert (b["name"], b["datasets"], b["pad"], b["normalize"]) == (
        "mnist_fashion",
        ["mnist", "fashion_mnist"],
        0,
        None,
    )
    assert b["max_train_per_task"] is None and b["max_test_per_task"] is None
    assert cfg["scenario"] == "domain"  # one shared 10-unit head
    m = cfg["model"]
    assert (m["name"], m["hidden"], m["batch_norm"], m["dropout"]) == (
        "mlp",
        *want["model"],
        0.0,
    )
    o = cfg["optimizer"]
    name, lr, momentum = want["optimizer"]
    assert (o["name"], o["lr"], o["weight_decay"]) == (name, lr, 0.0)
    if name == "sgd":
        assert o["momentum"] == momentum
    else:
        assert o["betas"] == [0.9, 0.999]
    assert (
        cfg["batch_size"],
        cfg["epochs"],
        cfg["iterations"],
        cfg["reset_optimizer"],
    ) == (want["batch_size"], want["epochs"], None, False)
    if method == "ewc":
        for key, value in want["ewc"].items():
            got = cfg["lambda"] if key == "lambda" else cfg["method"][key]
            assert got == value and type(got) is type(value), key
        options = {k: v for k, v in cfg["method"].items() if k not in ("name", "lambda")}
        ewc = build_method("ewc", cfg["lambda"], options)
        assert ewc.fisher_estimator == want["ewc"]["fisher_estimator"]
        assert ewc.half is want["ewc"]["half"]


def test_tradeoff_sweep_overrides_lambda_only():
    for lam in (1000, 10000, 100000):
        cfg = compose(f"experiment={TRADEOFF}", "method=ewc", f"lambda={lam}")
        assert cfg["lambda"] == lam and cfg["method"]["fisher_estimator"] == "batch_label_cross_mean_sq_grad"


# docs/protocols/curvature.md (D3)
D3_ROWS = ["finetune", "replay", *(f"{m}_{k}" for m in ("ewc", "ng_replay") for k in ("diag", "kfac", "dense"))]


@pytest.mark.parametrize("row", D3_ROWS)
def test_curvature_preset_follows_its_protocol(row):
    cfg = compose(f"experiment={CURVATURE}", f"row={row}")
    b = cfg["benchmark"]
    assert (b["name"], b["datasets"], b["pad"], b["normalize"]) == (
        "mnist_fellowship",
        ["mnist", "fashion_mnist", "kmnist"],
        0,
        None,
    )
    # one fixed 30-unit head from the first task and the norm clipped at 10: the demonstration's code (not its text)
    assert (cfg["scenario"], cfg["active_units"], cfg["eval_every"], cfg["clip_grad_norm"]) == (
        "class",
        "all",
        "epoch",
        10,
    )
    assert (cfg["model"]["name"], cfg["model"]["channels"], cfg["model"]["fc"], cfg["model"]["head_bias"]) == (
        "cnn_d3",
        [5, 5],
        [20],
        False,
    )
    o = cfg["optimizer"]
    assert (o["name"], o["lr"], o["momentum"], o["weight_decay"]) == ("sgd", 0.002, 0.9, 0.0)  # the code's momentum
    assert (cfg["batch_size"], cfg["epochs"], cfg["iterations"], cfg["reset_optimizer"]) == (256, 5, None, False)
    m = cfg["method"]
    method, _, kind = row.rpartition("_") if row.endswith(("diag", "kfac", "dense")) else (row, "", None)
    assert m["name"] == method and m.get("fisher") == kind
    if method == "ewc":  # λ (θ − θ*)ᵀ F (θ − θ*), no ½, λ = 10, the true Fisher (labels drawn from the softmax)
        assert (cfg["lambda"], m["half"], m["fisher_labels"], m["fisher_samples"]) == (10, False, "sample", None)
    if method in ("replay", "ng_replay"):
        assert (m["buffer_size"], m["replay_batch"]) == (1000, None)
    if method == "ng_replay":
        assert (m["damping"], m["recompute_every"]) == (0.01, 1)
    options = {k: v for k, v in m.items() if k not in ("name", "lambda")}
    built = build_method(method, cfg["lambda"], options)
    assert built.name == method


def test_curvature_preset_sweeps_every_compared_method_as_a_row():
    cfg = compose(f"experiment={CURVATURE}")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with hydra.initialize_config_module("cl_runner.configs", version_base="1.3"):
        full = hydra.compose("config", overrides=[f"experiment={CURVATURE}"], return_hydra_config=True)
    params = OmegaConf.to_container(full.hydra.sweeper.params)
    (override,) = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    assert override.key_or_group == "row" and list(override.sweep_string_iterator()) == D3_ROWS
    assert cfg["method"]["name"] == "finetune"  # a single run without row= is the finetune row
