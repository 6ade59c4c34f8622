import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

ROOT = Path(__file__).resolve().parents[1]
CL_RUN = [sys.executable, "-c", "from cl_runner.app import cli; cli()"]


def compose_config(*overrides: str):
    """The composed run config, as `cl-run <overrides>` would see it."""
    with initialize_config_module(config_module="cl_runner.configs", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def cl_run(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `cl-run` in a subprocess (same interpreter) and capture its output."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*CL_RUN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def installed_site(tmp_path_factory) -> Path:
    """The project installed as a user would (a plain, non-editable wheel) into a folder of its own;
    built once per test session."""
    site = tmp_path_factory.mktemp("installed") / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(ROOT)],
        check=True,
        capture_output=True,
    )
    return site


@pytest.fixture(scope="module")
def one_thread():
    """Small models on a shared 2-core machine: one thread is several times faster than two (and
    the same seed then gives the same matrix whatever the machine's core count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compose_cfg():
    return compose_config


def defaults(method: str, **given):
    """The options of configs/method/<method>.yaml (the one place for a method's defaults; constructors
    have none), updated by ``given``: for tests that build a method class directly."""
    from omegaconf import OmegaConf

    from cl_runner.build import options

    return {**options(OmegaConf.load(ROOT / "configs" / "method" / f"{method}.yaml")), **given}


# groups of tests that run on one worker, one after another, longest first
FIRST = ("slurm", "default_stream")


def pytest_collection_modifyitems(items):
    """Under pytest-xdist, the Slurm tests run on one worker, one after another (they share one cluster).
    The long groups (the Slurm tests ≈ 2 minutes, mostly waiting for Slurm; the default stream's runs)
    are handed out first, so that the other worker fills in beside them instead of one worker running
    a whole group alone at the end (pytest-xdist hands out work in collection order)."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))

    def rank(item) -> int:
        group = item.get_closest_marker("xdist_group")
        name = (group.args[0] if group.args else group.kwargs.get("name")) if group else None
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: each group and the rest keep their order
