"""Every method, bare and under every experiment preset, composes to the values it had before the
presets' per-method values moved from `protocol.*` + `oc.select` into configs/protocol/<experiment>/
<method>.yaml (chosen by each preset's defaults list). tests/data/composed_configs.json was written
by composing the configs of `main` at e8a7e41 (`protocol` key dropped); Hydra's instantiation keys
(`_target_`, `_partial_`) are not values and are left out of the comparison. Added deliberately since:
`method.fisher: diag` in the ewc and online_ewc entries (issue 11, its default = the old diagonal);
`active_units: seen` and `clip_grad_norm: null` everywhere (their defaults change nothing), and the
curvature preset's entries' values from its demonstration's code (active_units all, clip 10, momentum 0.9;
docs/protocols/curvature.md) and EWC's sampled Fisher labels there. Renamed since: the presets' keys to
their new names (docs/protocols/README.md, "Preset names"); the former names are aliases that compose to
the same values (tests/test_preset_aliases.py). Changed since: the EWC trade-off preset's EWC
`fisher_estimator: batch_label_cross_mean_sq_grad` (the notebook's estimator, docs/protocols/ewctradeoff.md).
Added with issue 20: `threads: auto` (was null) and `resume: auto` everywhere. Added with issue 23 (the DER
table's options; their defaults change nothing): `buffer: null` everywhere, `method.clip_grad_value: null`
(si), `method.fisher_weight: none` (online_ewc), and the rotated benchmark's `n_tasks: null`, `angle_range:
[0, 180]`, `interpolation: bilinear`."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

FROZEN = json.loads((Path(__file__).parent / "data" / "composed_configs.json").read_text())


def _values(node):
    if isinstance(node, dict):
        return {k: _values(v) for k, v in node.items() if not k.startswith("_")}
    return node


@pytest.mark.parametrize("overrides", sorted(FROZEN))
def test_composes_to_the_same_values_as_before(overrides, monkeypatch):
    monkeypatch.delenv("CL_RUNNER_DATA", raising=False)  # data_dir's default
    with hydra.initialize_config_module("cl_runner.configs", version_base="1.3"):
        cfg = hydra.compose("config", overrides=overrides.split())
    assert _values(OmegaConf.to_container(cfg, resolve=True)) == FROZEN[overrides]


def test_command_line_wins_over_a_preset():
    with hydra.initialize_config_module("cl_runner.configs", version_base="1.3"):
        exp = ["experiment=hsu2018_split_mnist_mlp400_domain", "method=si"]
        assert hydra.compose("config", overrides=exp)["lambda"] == 3000
        cfg = hydra.compose("config", overrides=[*exp, "lambda=7", "method.xi=0.5"])
    assert (cfg["lambda"], cfg.method.xi, cfg.method.grad) == (7, 0.5, "task")
