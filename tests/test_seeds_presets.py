"""The seeds' demonstrations (PROTOCOLS.md D1, D2) as presets: every value checked against a table
copied by hand from PROTOCOLS.md, and the EWC each preset builds uses the protocol's estimator."""

from __future__ import annotations

import hydra
import pytest
from omegaconf import OmegaConf

from cl_runner.methods import build_method

# PROTOCOLS.md D1 / D2
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
        "fisher_estimator": "squared_batch_grad",
        "fisher_labels": "true",
        "sq_grad_batch_size": 100,
        "sq_grad_batches": 2,
        "fisher_samples": None,
    },
}


def compose(*overrides: str) -> dict:
    with hydra.initialize_config_module("cl_runner.configs", version_base="1.3"):
        return OmegaConf.to_container(
            hydra.compose("config", overrides=list(overrides)), resolve=True
        )


@pytest.mark.parametrize(
    "preset, want", [("seeds_ewc_mnist_fashion", D1), ("seeds_ewc_tradeoff", D2)]
)
@pytest.mark.parametrize("method", ["finetune", "ewc"])
def test_seed_presets_follow_protocols_d1_d2(preset, want, method):
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
        options = {
            k: v for k, v in cfg["method"].items() if k not in ("name", "lambda")
        }
        ewc = build_method("ewc", cfg["lambda"], options)
        assert ewc.fisher_estimator == want["ewc"]["fisher_estimator"]
        assert ewc.half is want["ewc"]["half"]


def test_d2_sweep_overrides_lambda_only():
    for lam in (1000, 10000, 100000):
        cfg = compose("experiment=seeds_ewc_tradeoff", "method=ewc", f"lambda={lam}")
        assert (
            cfg["lambda"] == lam
            and cfg["method"]["fisher_estimator"] == "squared_batch_grad"
        )
