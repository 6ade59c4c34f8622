"""Adding a method is one method file + one config file: a throwaway method, defined in a temporary
module on sys.path and named by a config dropped into a temporary copy of the config tree, composes
and runs through the app's own path (run_experiment: checks, instantiation, trainer, files) with no
registry, list or test edit. CONTRIBUTING.md shows the same two files."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

METHOD_FILE = '''
"""Decay: every parameter pulled towards zero, L(θ) = L_t(θ) + λ · scale · Σ_i θ_i²."""

import torch

from cl_runner.methods import Method

CALLS = []  # (task, λ·penalty after the task) for the test


class Decay(Method):
    name = "decay"
    uses_strength = True

    def __init__(self, strength, scale):
        super().__init__(strength)
        self.scale = float(scale)

    def penalty(self, model):
        return self.scale * sum(p.square().sum() for p in model.parameters())

    def after_task(self, model, task):
        with torch.no_grad():
            CALLS.append((task.name, float(self.strength * self.penalty(model))))
'''

CONFIG_FILE = """# Decay (cl_throwaway_decay.py): λ · scale · Σ θ², towards zero
name: decay
_target_: cl_throwaway_decay.Decay
_partial_: true
lambda: 0.01
scale: 1.0
"""

SMALL = [
    "benchmark=split_digits",
    "benchmark.n_tasks=2",
    "benchmark.max_train_per_task=24",
    "benchmark.max_test_per_task=24",
    "epochs=1",
    "device=cpu",
    "threads=1",
]


@pytest.fixture
def throwaway(tmp_path, monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    (code / "cl_throwaway_decay.py").write_text(METHOD_FILE)
    monkeypatch.syspath_prepend(str(code))
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    (configs / "method" / "decay.yaml").write_text(CONFIG_FILE)
    yield configs
    sys.modules.pop("cl_throwaway_decay", None)


def test_a_method_is_one_file_and_one_config(throwaway, tmp_path):
    from cl_runner.run import run_experiment

    with initialize_config_dir(config_dir=str(throwaway), version_base="1.3"):
        cfg = compose("config", overrides=["method=decay", "method.scale=2.0", *SMALL])
        bad = compose("config", overrides=["method=decay", "+method.scal=2.0", *SMALL])
    assert cfg["lambda"] == 0.01  # the config's default λ reaches the top-level key
    result = run_experiment(cfg, tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk == result and on_disk["status"] == "ok"
    assert (on_disk["method"], on_disk["lambda"], on_disk["method_options"]) == ("decay", 0.01, {"scale": 2.0})
    assert len(on_disk["accuracy_matrix"]) == 2
    calls = importlib.import_module("cl_throwaway_decay").CALLS
    # the trainer called the new method after each task but the last (nothing reads importance after it)
    assert [name for name, _ in calls] == on_disk["task_names"][:-1]
    assert all(value > 0 for _, value in calls)
    # its options are checked like every method's: one line naming the valid ones
    with pytest.raises(ValueError, match=r"^method decay has no option scal; valid options: scale$"):
        run_experiment(bad, tmp_path / "bad")
