"""Every option of every config group is checked, from its one declaration, before any folder is made
(issue 20, "options that silently change the experiment"). Iterated from configs/: a new method,
model or optimizer file is covered without editing this test. (The benchmark group has its own,
tests/test_benchmark_options.py.)

Each numeric or list option is given values no experiment can mean — non-finite, the wrong type,
beyond what float32 holds or an integer of 2^62, an ill-typed list, and for counts (an
option whose default is a positive integer) zero and negative — and must be refused with one line
naming ``<group>.<key>`` by the object's own checks (the constructor, or the declarations of
cl_runner/checks.py and cl_runner/optimizers.py), which cl-run's precheck runs before Hydra makes any
folder (the end-to-end cases below check that wiring: exit 2, one `error:` line, no folder)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
NOT_OPTIONS = ("name", "_target_", "_partial_", "lambda")


def _options(group: str) -> list[tuple[str, str, object]]:
    """(file stem, key, default) of every numeric or list option of every config of ``group``."""
    found = []
    for path in sorted((CONFIGS / group).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        for key, value in node.items():
            if key in NOT_OPTIONS:
                continue
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric or isinstance(value, list):
                found.append((path.stem, key, value))
    return found


def _bad_values(default: object) -> list[object]:
    """Values no option with this default may accept."""
    if isinstance(default, list):
        item = default[0] if default else 1
        return ["abc", [math.nan], ["abc"], [item, "abc"], [[item]]]
    bad: list[object] = [math.nan, math.inf, -math.inf, "abc", [1, 2]]
    if isinstance(default, int):
        bad += [2**62, 1.5]
        if default > 0:
            bad += [0, -1]
    else:
        bad += [1e39, -1e39]
    return bad


def _cases(group: str) -> list[tuple[str, str, object]]:
    return [(stem, key, bad) for stem, key, default in _options(group) for bad in _bad_values(default)]


def _check_refusal(error: BaseException, key: str) -> None:
    text = str(error)
    assert "\n" not in text.strip(), text
    assert key in text, f"the message does not name {key}: {text}"


def _ids(cases):
    return [f"{stem}.{key}={bad!r}" for stem, key, bad in cases]


METHOD_CASES = _cases("method")
MODEL_CASES = _cases("model")
OPTIMIZER_CASES = _cases("optimizer")


@pytest.mark.parametrize(("stem", "key", "bad"), METHOD_CASES, ids=_ids(METHOD_CASES))
def test_every_method_option_refuses_what_it_cannot_mean(stem, key, bad):
    from cl_runner.methods import method_from_config

    node = OmegaConf.to_container(OmegaConf.load(CONFIGS / "method" / f"{stem}.yaml"))
    with pytest.raises(ValueError) as e:
        method_from_config({**node, key: bad}, node.get("lambda"))
    _check_refusal(e.value, f"method.{key}")


@pytest.mark.parametrize(("stem", "key", "bad"), MODEL_CASES, ids=_ids(MODEL_CASES))
def test_every_model_option_refuses_what_it_cannot_mean(stem, key, bad):
    from cl_runner.models import build_model

    node = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{stem}.yaml"))
    with pytest.raises(ValueError) as e:
        build_model({**node, key: bad}, (1, 32, 32), 10)
    _check_refusal(e.value, f"model.{key}")


@pytest.mark.parametrize(("stem", "key", "bad"), OPTIMIZER_CASES, ids=_ids(OPTIMIZER_CASES))
def test_every_optimizer_option_refuses_what_it_cannot_mean(stem, key, bad):
    from cl_runner.optimizers import make_optimizer_factory

    node = OmegaConf.to_container(OmegaConf.load(CONFIGS / "optimizer" / f"{stem}.yaml"))
    with pytest.raises(ValueError) as e:
        make_optimizer_factory({**node, key: bad})
    _check_refusal(e.value, f"optimizer.{key}")


TOP = [
    (key, default)
    for key, default in OmegaConf.to_container(OmegaConf.load(CONFIGS / "config.yaml"), resolve=False).items()
    if key not in ("defaults", "hydra")
]
TOP_CASES = [
    ("config", key, bad)
    for key, default in TOP
    if (isinstance(default, (int, float)) and not isinstance(default, bool))
    or key in ("iterations", "clip_grad_norm")  # numbers whose default is null
    for bad in _bad_values(default if default is not None else 1.0 if key == "clip_grad_norm" else 1)
]


@pytest.mark.parametrize(("stem", "key", "bad"), TOP_CASES, ids=_ids(TOP_CASES))
def test_every_top_level_option_refuses_what_it_cannot_mean(compose_cfg, stem, key, bad):
    from cl_runner.checks import check_top_level

    cfg = compose_cfg()
    cfg[key] = bad
    with pytest.raises(ValueError) as e:
        check_top_level(cfg)
    _check_refusal(e.value, key)


def test_unknown_top_level_keys_are_refused_even_with_a_plus(compose_cfg):
    from cl_runner.checks import check_top_level

    cfg = compose_cfg("+lamda=5")
    with pytest.raises(ValueError, match=r"unknown key 'lamda'.*did you mean 'lambda'"):
        check_top_level(cfg)


# ----------------------------------------------------------------------------- end to end: the wiring
E2E = [
    ["+lamda=5"],
    ["seed=99999999999999"],
    ["method=ewc", "lambda=1e39"],
    ["method=ewc", "method.fisher_samples=0"],
    ["optimizer=adam", "optimizer.betas=[2.0,0.5]"],
    ["optimizer=sgd", "optimizer.momentum=-0.5"],
    ["method=replay", "method.buffer_size=1e30"],
    ["model.hidden=[400,-1]"],
    ["epochs=1000000000"],
]


@pytest.mark.parametrize("args", E2E, ids=[" ".join(a) for a in E2E])
def test_cl_run_refuses_in_one_line_before_any_folder(tmp_path, monkeypatch, capsys, args):
    from cl_runner.app import main

    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cl-run", *args, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    key = args[-1].lstrip("+").split("=")[0]
    assert key.removeprefix("method.").removeprefix("optimizer.").removeprefix("model.") in lines[0]
    assert not run_dir.exists() and not (tmp_path / "outputs").exists()
