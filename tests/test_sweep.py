"""Sweep summaries: hand-written job folders (fast) and real `cl-run -m` sweeps (slow, subprocess)."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cl_runner import sweep

REPO = Path(__file__).resolve().parents[1]
# `cl-run` through the same interpreter (works whether or not the venv's bin/ is on PATH)
CL_RUN = [sys.executable, "-c", "from cl_runner.app import main; main()"]


def _needs(plugin: str, extra_name: str):
    """The launcher plugins come with the `launchers` extra: pip install -e '.[test,launchers]'."""
    return pytest.importorskip(plugin, reason=f"{extra_name} not installed (pip install -e '.[launchers]')")
# The smallest end-to-end run on the offline benchmark: 2 tasks of the 8x8 digits, one epoch.
FAST = ["epochs=1", "benchmark.n_tasks=2", "batch_size=64", "device=cpu"]


# ----------------------------------------------------------------------------- hand-written folders
def _job(root: Path, name: str, metrics: dict | None = None, overrides: list[str] | None = None,
         config: dict | None = None) -> Path:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides or []))
    if config is not None:
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "tb").mkdir()
    return d


def _metrics(acc, *, method="l2", lam=1.0, seed=0, status="ok", error=None, **extra):
    m = {
        "status": status, "error": error, "method": method, "lambda": lam, "benchmark": "split_digits",
        "scenario": "domain", "seed": seed, "model": "mlp", "optimizer": "adam", "experiment": None,
        "method_options": extra.pop("method_options", {}),
        "acc": acc, "bwt": None if acc is None else acc - 0.9, "fwt": None if acc is None else 0.01,
        "forgetting": None if acc is None else 0.9 - acc, "learning_accuracy": None if acc is None else 0.9,
        "wall_time_s": None if acc is None else 1.5,
    }
    m.update(extra)
    return m


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def mixed_sweep(tmp_path):
    """Jobs 0, 1, 10 ok; 2 failed; 3 has .hydra but no metrics.json (crashed / running)."""
    root = tmp_path / "sweep"
    _job(root, "0_lambda=1,method=l2", _metrics(0.8123456789012345, lam=1.0), ["method=l2", "lambda=1"])
    _job(root, "1_lambda=10,method=l2", _metrics(0.7, lam=10.0), ["method=l2", "lambda=10"])
    _job(root, "10_lambda=1000,method=l2", _metrics(0.5, lam=1000.0), ["method=l2", "lambda=1000"])
    _job(root, "2_lambda=-1,method=l2", _metrics(None, lam=-1, status="failed", error="lambda must be >= 0, got -1"),
         ["method=l2", "lambda=-1"])
    _job(root, "3_lambda=100,method=l2", None, ["method=l2", "lambda=100"],
         config={"seed": 4, "scenario": "class", "lambda": "${method.lambda}",
                 "method": {"name": "l2", "lambda": 100, "extra_opt": 3},
                 "benchmark": {"name": "split_digits"}, "model": {"name": "mlp"}, "optimizer": {"name": "adam"}})
    (root / "multirun.yaml").write_text("hydra: {}\n")
    (root / ".submitit" / "123").mkdir(parents=True)  # launcher logs: never a job
    (root / ".submitit" / "123" / "metrics.json").write_text("{}")
    return root


def test_collect_one_row_per_job_in_job_order(mixed_sweep):
    rows = sweep.collect(mixed_sweep)
    assert [r["num"] for r in rows] == [0, 1, 2, 3, 10]  # numeric, not string, order
    by = {r["num"]: r for r in rows}
    assert by[0]["status"] == "ok" and by[0]["acc"] == 0.8123456789012345 and by[0]["lambda"] == 1.0
    assert by[0]["job"] == "0_lambda=1,method=l2" and by[0]["overrides"] == ["method=l2", "lambda=1"]
    assert by[2]["status"] == "failed" and "lambda must be >= 0" in by[2]["error"] and by[2]["acc"] is None
    missing = by[3]
    assert missing["status"] == "missing" and missing["acc"] is None
    # identifying fields recovered from .hydra/config.yaml (interpolation resolved)
    assert (missing["method"], missing["lambda"], missing["seed"], missing["scenario"]) == ("l2", 100, 4, "class")
    assert missing["method_options"] == {"extra_opt": 3}


def test_collect_without_config_yaml_uses_overrides(tmp_path):
    d = tmp_path / "0_lambda=5,method=l2,seed=2"
    d.mkdir(parents=True)
    (d / "app.log").write_text("")
    (d / "metrics.json").write_text("{not json")  # half-written or corrupted
    _job(tmp_path, "1_lambda=7,method=si", None, ["method=si", "lambda=7", "seed=3"])
    rows = sweep.collect(tmp_path)
    assert [r["status"] for r in rows] == ["failed", "missing"]
    assert (rows[0]["method"], rows[0]["lambda"], rows[0]["seed"]) == ("l2", 5, 2)  # from the folder name
    assert (rows[1]["method"], rows[1]["lambda"], rows[1]["seed"]) == ("si", 7, 3)


def test_write_summary_csv_matches_metrics_and_marks_failures(mixed_sweep):
    rows = sweep.collect(mixed_sweep)
    csv_path, md_path = sweep.write_summary(mixed_sweep, rows)
    assert csv_path == mixed_sweep / "summary.csv" and md_path == mixed_sweep / "summary.md"
    table = _read_csv(csv_path)
    assert len(table) == 5
    for line in table:
        m = mixed_sweep / line["job"] / "metrics.json"
        if line["status"] == "ok":
            data = json.loads(m.read_text())
            for k in ("acc", "bwt", "fwt", "forgetting", "learning_accuracy", "wall_time_s"):
                assert float(line[k]) == data[k]  # full precision, no rounding
            assert float(line["lambda"]) == data["lambda"] and line["method"] == data["method"]
    status = {line["num"]: line["status"] for line in table}
    assert status == {"0": "ok", "1": "ok", "2": "failed", "3": "missing", "10": "ok"}
    failed = next(line for line in table if line["num"] == "2")
    assert failed["acc"] == "" and failed["error"] == "lambda must be >= 0, got -1"
    md = md_path.read_text()
    assert "5 jobs: 3 ok, 1 failed, 1 missing" in md
    assert "| 0 | 0_lambda=1,method=l2 | l2 | 1 | split_digits | domain | 0 | 81.23 |" in md
    assert "`2_lambda=-1,method=l2` (failed): lambda must be >= 0, got -1" in md
    assert "Mean ± std" not in md and not (mixed_sweep / "summary_grouped.csv").exists()  # one seed per setting


def test_grouped_mean_std_over_seeds(tmp_path):
    accs = {("l2", 1.0): [0.81, 0.77, 0.92], ("l2", 10.0): [0.60, 0.64, None]}  # None: a failed seed
    n = 0
    for (method, lam), values in accs.items():
        for seed, a in enumerate(values):
            status = "ok" if a is not None else "failed"
            _job(tmp_path, f"{n}_lambda={lam:g},seed={seed}", _metrics(a, method=method, lam=lam, seed=seed, status=status),
                 [f"lambda={lam:g}", f"seed={seed}"])
            n += 1
    # same λ and seeds but another epochs: a different setting, not merged into λ=1
    for seed, a in enumerate([0.1, 0.3]):
        _job(tmp_path, f"{n}_epochs=5,lambda=1,seed={seed}", _metrics(a, lam=1.0, seed=seed), ["epochs=5", "lambda=1", f"seed={seed}"])
        n += 1
    rows = sweep.collect(tmp_path)
    sweep.write_summary(tmp_path, rows)
    grouped = _read_csv(tmp_path / "summary_grouped.csv")
    assert len(grouped) == 3
    g1 = next(g for g in grouped if g["lambda"] == "1.0" and g["other"] == "")
    g10 = next(g for g in grouped if g["lambda"] == "10.0")
    g5 = next(g for g in grouped if g["other"] == "epochs=5")
    assert (g1["n_jobs"], g1["n_ok"], g10["n_jobs"], g10["n_ok"]) == ("3", "3", "3", "2")
    assert float(g1["acc_mean"]) == pytest.approx(statistics.fmean([0.81, 0.77, 0.92]))
    assert float(g1["acc_std"]) == pytest.approx(statistics.stdev([0.81, 0.77, 0.92]))  # n - 1
    assert float(g10["acc_mean"]) == pytest.approx(0.62) and float(g10["acc_std"]) == pytest.approx(0.0282842712)
    assert float(g5["acc_mean"]) == pytest.approx(0.2)
    md = (tmp_path / "summary.md").read_text()
    assert "## Mean ± std over seeds" in md
    assert f"{100 * statistics.fmean([0.81, 0.77, 0.92]):.2f} ± {100 * statistics.stdev([0.81, 0.77, 0.92]):.2f}" in md
    assert "| 2 / 3 |" in md


def test_rebuilt_summary_drops_a_stale_grouped_table(tmp_path):
    _job(tmp_path, "0_seed=0", _metrics(0.5, seed=0), ["seed=0"])
    (tmp_path / "summary_grouped.csv").write_text("stale\n")
    sweep.write_summary(tmp_path, sweep.collect(tmp_path))
    assert not (tmp_path / "summary_grouped.csv").exists()


def test_print_summary_shows_jobs_failures_and_groups(mixed_sweep):
    from rich.console import Console

    console = Console(record=True, width=220)
    rows = sweep.collect(mixed_sweep)
    rows.append(dict(rows[0], num=11, job="11_x", seed=1, acc=0.6))  # a second seed for λ=1
    sweep.print_summary(rows, console)
    text = console.export_text()
    assert "Sweep summary: 6 jobs: 4 ok, 1 failed, 1 missing" in text
    assert "81.23" in text and "lambda must be >= 0, got -1" in text
    assert "Mean ± std over seeds" in text and f"{100 * (0.8123456789012345 + 0.6) / 2:.2f} ±" in text


def test_callback_summarizes_and_never_raises(mixed_sweep, monkeypatch, capsys):
    from omegaconf import OmegaConf

    cb = sweep.SummaryCallback()
    cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(mixed_sweep)}}}))
    assert len(_read_csv(mixed_sweep / "summary.csv")) == 5

    def broken(*a, **k):
        raise RuntimeError("disk full\nsecond line")

    monkeypatch.setattr(sweep, "summarize", broken)
    cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(mixed_sweep)}}}))
    err = capsys.readouterr().err
    assert "summary: could not summarize the sweep: RuntimeError: disk full second line" in err
    cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(mixed_sweep / "nope")}}}))
    cb.on_multirun_end(OmegaConf.create({}))  # no hydra node at all
    assert "does not exist" in capsys.readouterr().err


def test_summarize_script(mixed_sweep, tmp_path):
    script = REPO / "scripts" / "summarize.py"
    (mixed_sweep / "summary.csv").unlink(missing_ok=True)
    res = subprocess.run([sys.executable, str(script), str(mixed_sweep)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(_read_csv(mixed_sweep / "summary.csv")) == 5 and "Sweep summary" in res.stdout
    for bad in (tmp_path / "does-not-exist", tmp_path / "empty"):
        if bad.name == "empty":
            bad.mkdir()
        res = subprocess.run([sys.executable, str(script), str(bad)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1


def test_slurm_launcher_preset_composes():
    import hydra

    _needs("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")

    with hydra.initialize_config_module("cl_runner.configs", version_base="1.3"):
        cfg = hydra.compose(
            "config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("slurm_launcher.ClRunnerSlurmLauncher")  # tests/test_slurm.py
    assert (launcher.partition, launcher.timeout_min) == ("gpu", 30)
    assert launcher.gpus_per_node is None and launcher.array_parallelism == 16
    assert launcher.cpus_per_task == 1 and launcher.mem_gb is None  # mem_gb: from the benchmark
    assert cfg.hydra.callbacks.summary._target_ == "cl_runner.sweep.SummaryCallback"


# ----------------------------------------------------------------------------- real sweeps
def _cl_run(*args: str, timeout: int = 240, code: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    res = subprocess.run([*CL_RUN, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert res.returncode == code, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def _job_folders(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))


@pytest.mark.slow
def test_lambda_sweep_basic_launcher(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    out = tmp_path / "sweep"
    res = _cl_run("method=l2", "lambda=0.1,1,10", *FAST, f"hydra.sweep.dir={out}")
    jobs = _job_folders(out)
    assert [j.name for j in jobs] == [
        f"{i}_batch_size=64,benchmark.n_tasks=2,epochs=1,lambda={lam},method=l2" for i, lam in enumerate(["0.1", "1", "10"])
    ]
    table = _read_csv(out / "summary.csv")
    assert len(table) == 3 and (out / "summary.md").is_file()
    assert "Sweep summary: 3 jobs: 3 ok, 0 failed" in res.stdout
    for job, line in zip(jobs, table):
        data = json.loads((job / "metrics.json").read_text())
        assert line["job"] == job.name and line["status"] == "ok"
        assert float(line["acc"]) == data["acc"] and float(line["lambda"]) == data["lambda"]
        # the run's HParams session, read back from its event files
        acc = EventAccumulator(str(job / "tb"), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
        acc.Reload()
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        assert start.hparams["lambda"].number_value == pytest.approx(data["lambda"])
        assert start.hparams["method"].string_value == "l2"
        assert acc.Scalars("hparam/acc")[0].value == pytest.approx(data["acc"], abs=1e-6)
        assert "accuracy_matrix/heatmap" in acc.Tags()["images"]
    # pointed at the sweep directory, the HParams dashboard lists the three runs together
    from test_tb_extras import _hparams_dashboard

    exp, groups = _hparams_dashboard(out)
    sessions = {s.name for g in groups for s in g.sessions}
    assert sessions == {f"{j.name}/tb" for j in jobs}
    lam = next(h for h in exp.hparam_infos if h.name == "lambda")
    assert (lam.domain_interval.min_value, lam.domain_interval.max_value) == (0.1, 10.0)


@pytest.mark.slow
def test_failed_job_is_a_failed_row_under_joblib(tmp_path):
    """epochs=0 is refused by validation: that job records status failed, the sweep and its
    summary go on (run through the joblib launcher: jobs in worker processes, summary from disk)."""
    _needs("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher")
    out = tmp_path / "sweep"
    fast = [a for a in FAST if not a.startswith("epochs")]
    # a sweep in which a job failed exits 1, after writing its summary
    _cl_run("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=finetune", "epochs=1,0", *fast,
            f"hydra.sweep.dir={out}", code=1)
    table = _read_csv(out / "summary.csv")
    assert [(t["num"], t["status"]) for t in table] == [("0", "ok"), ("1", "failed")]
    assert "epochs" in table[1]["error"] and table[1]["acc"] == ""
    assert float(table[0]["acc"]) == json.loads((out / table[0]["job"] / "metrics.json").read_text())["acc"]
    md = (out / "summary.md").read_text()
    assert "2 jobs: 1 ok, 1 failed" in md and "(failed): epochs must be a positive integer" in md


@pytest.mark.slow
def test_submitit_local_sweep_is_summarized(tmp_path):
    _needs("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")
    out = tmp_path / "sweep"
    _cl_run("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "seed=0,1", *FAST,
            f"hydra.sweep.dir={out}", timeout=400)
    jobs = _job_folders(out)
    assert len(jobs) == 2 and (out / ".submitit").is_dir()
    table = _read_csv(out / "summary.csv")
    assert [t["seed"] for t in table] == ["0", "1"] and all(t["status"] == "ok" for t in table)
    for job, line in zip(jobs, table):
        assert float(line["acc"]) == json.loads((job / "metrics.json").read_text())["acc"]
    grouped = _read_csv(out / "summary_grouped.csv")  # two seeds of one setting
    assert len(grouped) == 1 and grouped[0]["n_ok"] == "2"
