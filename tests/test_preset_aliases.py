"""The experiment presets' former names (docs/protocols/README.md, "Former names") are aliases kept for one
release: `cl-run experiment=<former> method=<m>` composes to exactly the values of the new name, the
per-method values of configs/protocol/<new>/<m>.yaml included (the files checked for every method,
compositions sampled), also from an installed wheel. An alias is a file that pulls the new one into its
defaults list, marked by the comment line `# alias of <new> (kept for one release; …)`; nothing else may be in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# former name -> new name (the table of docs/protocols/README.md)
RENAMED = {
    "hsu2018_split_mnist_task": "hsu2018_split_mnist_mlp400_task",
    "hsu2018_split_mnist_domain": "hsu2018_split_mnist_mlp400_domain",
    "hsu2018_split_mnist_class": "hsu2018_split_mnist_mlp400_class",
    "vandeven2019_permuted_mnist_task": "vandeven2019_permuted_mnist_mlp1000_task",
    "vandeven2019_permuted_mnist_domain": "vandeven2019_permuted_mnist_mlp1000_domain",
    "vandeven2019_permuted_mnist_class": "vandeven2019_permuted_mnist_mlp1000_class",
    "seeds_ewc_mnist_fashion": "ewctutorial_mnist_fashion_mlp256_domain",
    "seeds_ewc_tradeoff": "ewctradeoff_mnist_fashion_mlp256bn_domain",
    "seeds_fellowship_cnn": "curvature_mnist_fashion_kmnist_cnn_class",
    "seeds_rotated_mnist": "regularizers_rotated_mnist_mlp400_domain",
}
METHODS = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml"))
ROWS = sorted(p.stem for p in (CONFIGS / "row").glob("*.yaml"))


def alias_target(path: Path) -> str | None:
    """The new name an alias file names in its `# alias of <new> (kept for one release; …)` line, else None."""
    marks = [line for line in path.read_text().splitlines() if line.startswith("# alias of ")]
    if not marks:
        return None
    (mark,) = marks
    assert "(kept for one release;" in mark, mark
    return mark.removeprefix("# alias of ").split(" ", 1)[0]


def test_every_former_name_is_a_marked_alias_of_its_new_name():
    found = {p.stem: alias_target(p) for p in (CONFIGS / "experiment").glob("*.yaml")}
    assert {old: new for old, new in found.items() if new} == RENAMED
    assert all(found[new] is None for new in RENAMED.values())  # the new presets hold the values
    for old, new in RENAMED.items():
        # nothing but the pull of the new preset: the alias can hold no value of its own
        assert OmegaConf.to_container(OmegaConf.load(CONFIGS / "experiment" / f"{old}.yaml")) == {"defaults": [new]}
        old_dir, new_dir = CONFIGS / "protocol" / old, CONFIGS / "protocol" / new
        assert sorted(p.name for p in old_dir.glob("*.yaml")) == sorted(p.name for p in new_dir.glob("*.yaml"))
        for f in old_dir.glob("*.yaml"):
            assert alias_target(f) == f"protocol/{new}/{f.stem}", f
            assert OmegaConf.to_container(OmegaConf.load(f)) == {"defaults": [f"/protocol/{new}/{f.stem}@_here_"]}
            assert alias_target(new_dir / f.name) is None


def composed(*overrides: str) -> tuple[dict, dict | None]:
    """The job's values (resolved) and the sweep the preset asks for (`hydra.sweeper.params`)."""
    cfg = hydra.compose("config", overrides=list(overrides), return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    sweep = None if params is None else OmegaConf.to_container(params)
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True), sweep


def _protocol_methods(new: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / "protocol" / new).glob("*.yaml"))


# Composing every method through every alias would only repeat what the file test above proves (an alias
# and its per-method files hold nothing but the pull of the new ones): per alias, the bare preset, one
# method with a per-method file and one without, a row where the preset sweeps rows, and command-line values
CASES = [
    (old, extra)
    for old in sorted(RENAMED)
    for extra in (
        "",
        *(f"method={m}" for m in _protocol_methods(RENAMED[old])[:1]),
        *[f"method={m}" for m in METHODS if m not in _protocol_methods(RENAMED[old])][:1],
        *(f"row={r}" for r in ROWS[:2] if old == "seeds_fellowship_cnn"),
        "method=ewc lambda=7 method.half=false optimizer=sgd",
    )
]


@pytest.mark.parametrize("old, extra", CASES)
def test_former_name_composes_to_the_same_values_as_the_new_name(old, extra, monkeypatch):
    monkeypatch.delenv("CL_RUNNER_DATA", raising=False)
    new = RENAMED[old]
    with hydra.initialize_config_module("cl_runner.configs", version_base="1.3"):
        via_alias = composed(f"experiment={old}", *extra.split())
        via_name = composed(f"experiment={new}", *extra.split())
    assert via_alias == via_name
    # the preset's per-method values arrived through the alias (configs/protocol/<old>/<m>.yaml)
    method = via_alias[0]["method"]["name"]
    protocol = CONFIGS / "protocol" / new / f"{method}.yaml"
    if protocol.is_file() and "lambda=" not in extra:
        given = OmegaConf.to_container(OmegaConf.load(protocol))
        assert {k: via_alias[0]["method"][k] for k in given} == given


@pytest.mark.slow
def test_alias_composes_the_same_from_an_installed_wheel(tmp_path, installed_site):
    """No symlinks, no source tree: the installed package's configs carry the aliases."""
    env = {**os.environ, "PYTHONPATH": str(installed_site)}
    env.pop("CL_RUNNER_DATA", None)
    script = installed_site / "bin" / "cl-run"

    def job_config(name: str) -> str:
        proc = subprocess.run(
            [sys.executable, str(script), f"experiment={name}", "row=ewc_kfac", "--cfg", "job", "--resolve"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    new = job_config("curvature_mnist_fashion_kmnist_cnn_class")
    assert "fisher: kfac" in new and "lambda: 10" in new  # the per-method file reached the installed run
    assert job_config("seeds_fellowship_cnn") == new
