"""The offline default demonstrates continual learning (issue 9, item 1), checked on the real
defaults through the real config composition, mean over seeds 0, 1, 2:

- ``cl-run`` (finetune) forgets clearly: BWT ≤ −15 points;
- ``cl-run method=ewc lambda=1000`` improves ACC by ≥ 5 points and BWT by ≥ 10 points;

and, on seed 0 (each method's run against finetune's of the same seed; the three seeds of every
method would double this file's time, which CI's 20 minutes cannot hold):

- a λ sweep of EWC is a trade-off: BWT rises and learning accuracy falls (or stays) as λ grows,
  with no collapse of both at large λ (here finetune = λ 0, then λ = 100, 1000, 1e5 of the
  README's 10 … 1e5);
- every regularizer at its default strength beats finetune's ACC and BWT (RWalk and SCP its BWT by
  ≥ 5 points, issue 12).

All runs of this file share one cache on one xdist worker (each configuration and seed runs once).

The measured numbers behind the defaults are in configs/config.yaml and configs/method/*.yaml.
"""

from __future__ import annotations

import contextlib
import io

import hydra
import pytest
from omegaconf import OmegaConf

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("default_stream")]

SEEDS = (0, 1, 2)
REGULARIZED = ("l2", "ewc", "online_ewc", "mas", "si", "rwalk", "scp")
BWT_GAIN = {"rwalk": 0.05, "scp": 0.05}  # issue 12's margin for the two methods it added
SWEEP = (100, 1000, 100000)
LA_SLACK = 0.01  # "falls (or stays)": one point of noise allowed between neighbouring λ


def compose(*overrides: str):
    with hydra.initialize_config_module("cl_runner.configs", version_base="1.3"):
        return hydra.compose("config", overrides=["device=cpu", *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Mean ACC, BWT and learning accuracy over ``seeds`` of ``cl-run <overrides>``; each run is cached
    by its resolved config, so ``method=ewc`` and ``method=ewc lambda=<its default>`` run once."""
    from cl_runner.run import run_experiment

    cache: dict[str, dict] = {}

    def one(cfg) -> dict:
        key = OmegaConf.to_yaml(cfg, resolve=True)
        if key not in cache:
            with contextlib.redirect_stdout(io.StringIO()):
                cache[key] = run_experiment(cfg, tmp_path_factory.mktemp("run"))
            assert cache[key]["status"] == "ok"
        return cache[key]

    def go(*overrides: str, seeds: tuple[int, ...] = SEEDS) -> dict:
        results = [one(compose(*overrides, f"seed={s}")) for s in seeds]
        mean = {k: sum(r[k] for r in results) / len(results) for k in ("acc", "bwt", "learning_accuracy")}
        return {**mean, "runs": results}

    return go


def test_default_is_finetune_on_the_documented_stream():
    cfg = OmegaConf.to_container(compose(), resolve=True)
    assert cfg["method"]["name"] == "finetune" and cfg["benchmark"]["name"] == "permuted_digits"
    assert cfg["scenario"] == "domain"
    ewc = OmegaConf.to_container(compose("method=ewc"), resolve=True)
    assert ewc["lambda"] == 1000 and ewc["method"]["fisher_labels"] == "all"
    assert ewc["method"]["fisher_estimator"] == "per_sample"


def test_finetune_forgets_and_ewc_1000_remembers(run):
    ft, ewc = run(), run("method=ewc", "lambda=1000")
    assert all(r["method"] == "finetune" for r in ft["runs"])
    assert all(r["method"] == "ewc" and r["lambda"] == 1000 for r in ewc["runs"])
    assert ft["bwt"] <= -0.15, ft
    assert ewc["acc"] >= ft["acc"] + 0.05, (ewc["acc"], ft["acc"])
    assert ewc["bwt"] >= ft["bwt"] + 0.10, (ewc["bwt"], ft["bwt"])


def test_ewc_lambda_sweep_trades_learning_for_remembering(run):
    ft = run(seeds=(0,))
    rows = [ft] + [run("method=ewc", f"lambda={lam}", seeds=(0,)) for lam in SWEEP]  # finetune is λ = 0
    for small, large in zip(rows, rows[1:], strict=False):
        assert large["bwt"] > small["bwt"], [r["bwt"] for r in rows]
        assert large["learning_accuracy"] <= small["learning_accuracy"] + LA_SLACK, [
            r["learning_accuracy"] for r in rows
        ]
    # no collapse of both at large λ: the strongest still forgets far less than finetune
    assert rows[-1]["bwt"] > ft["bwt"] + 0.10


@pytest.mark.parametrize("method", REGULARIZED)
def test_every_regularizer_at_its_default_beats_finetune(run, method):
    ft, ours = run(seeds=(0,)), run(f"method={method}", seeds=(0,))
    default = compose(f"method={method}")["lambda"]
    assert all(r["method"] == method and r["lambda"] == default for r in ours["runs"])
    assert ours["acc"] > ft["acc"], (method, ours["acc"], ft["acc"])
    assert ours["bwt"] > ft["bwt"] + BWT_GAIN.get(method, 0.0), (method, ours["bwt"], ft["bwt"])
