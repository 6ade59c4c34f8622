"""The configs ship inside the package: a plain (non-editable) install finds them from any directory."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_configs_found_after_non_editable_install(tmp_path, installed_site):
    site = installed_site
    assert (site / "cl_runner" / "configs" / "config.yaml").exists()
    assert (site / "cl_runner" / "configs" / "method" / "finetune.yaml").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    # the installed console script, run from a folder that has no configs/
    script = site / "bin" / "cl-run"
    where = subprocess.run(
        [sys.executable, "-c", "import cl_runner; print(cl_runner.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(site)), where.stdout  # the installed copy, not the source tree
    proc = subprocess.run(
        [sys.executable, str(script), "epochs=1", "hydra.run.dir=run"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (elsewhere / "run" / "metrics.json").exists()
    helped = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert "split_digits" in helped.stdout and "finetune" in helped.stdout
    # the search path plugin ships in the wheel: a folder of CL_RUNNER_CONFIG_PATH joins the groups
    assert (site / "hydra_plugins" / "cl_runner_searchpath" / "searchpath_plugin.py").is_file()
    mine = tmp_path / "my_configs" / "method"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("name: mine\n_target_: cl_runner.methods.l2.L2\n_partial_: true\nlambda: 1\n")
    env = {**env, "CL_RUNNER_CONFIG_PATH": str(mine.parent)}
    helped = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    listed = next(line for line in helped.stdout.splitlines() if line.startswith("method: "))
    assert {"mine", "ewc", "finetune"} <= set(listed[len("method: ") :].split(", "))
