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
