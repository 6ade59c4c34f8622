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

from cl_runner.report import summary as sweep

REPO = Path(__file__).resolve().parents[1]
# `cl-run` through the same interpreter (works whether or not the venv's bin/ is on PATH)
CL_RUN = [sys.executable, "-c", "from cl_runner.app import cli; cli()"]


def _needs(plugin: str, extra_name: str):
    """The launcher plugins come with the `launchers` extra: pip install -e '.[test,launchers]'."""
    return pytest.importorskip(plugin, reason=f"{extra_name} not installed (pip install -e '.[launchers]')")


# The smallest end-to-end run on the offline benchmark: 2 tasks of the 8x8 digits, one epoch.
FAST = ["epochs=1", "benchmark.n_tasks=2", "batch_size=64", "device=cpu"]


# ----------------------------------------------------------------------------- hand-written folders
def _job(
    root: Path, name: str, metrics: dict | None = None, overrides: list[str] | None = None, config: dict | None = None
) -> Path:
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
        "status": status,
        "error": error,
        "method": method,
        "lambda": lam,
        "benchmark": "split_digits",
        "scenario": "domain",
        "seed": seed,
        "model": "mlp",
        "optimizer": "adam",
        "experiment": None,
        "method_options": extra.pop("method_options", {}),
        "acc": acc,
        "bwt": None if acc is None else acc - 0.9,
        "fwt": None if acc is None else 0.01,
        "forgetting": None if acc is None else 0.9 - acc,
        "learning_accuracy": None if acc is None else 0.9,
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
    _job(
        root,
        "2_lambda=-1,method=l2",
        _metrics(None, lam=-1, status="failed", error="lambda must be >= 0, got -1"),
        ["method=l2", "lambda=-1"],
    )
    _job(
        root,
        "3_lambda=100,method=l2",
        None,
        ["method=l2", "lambda=100"],
        config={
            "seed": 4,
            "scenario": "class",
            "lambda": "${method.lambda}",
            "method": {"name": "l2", "lambda": 100, "extra_opt": 3},
            "benchmark": {"name": "split_digits"},
            "model": {"name": "mlp"},
            "optimizer": {"name": "adam"},
        },
    )
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
            for k in ("acc", "bwt", "fwt", "forgetting", "learning_accuracy"):
                assert float(line[f"{k}_pct"]) == pytest.approx(100 * data[k], rel=1e-12)  # percent, no rounding
            assert float(line["wall_time_s"]) == data["wall_time_s"]
            assert float(line["lambda"]) == data["lambda"] and line["method"] == data["method"]
    status = {line["num"]: line["status"] for line in table}
    assert status == {"0": "ok", "1": "ok", "2": "failed", "3": "missing", "10": "ok"}
    failed = next(line for line in table if line["num"] == "2")
    assert failed["acc_pct"] == "" and failed["error"] == "lambda must be >= 0, got -1"
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
            _job(
                tmp_path,
                f"{n}_lambda={lam:g},seed={seed}",
                _metrics(a, method=method, lam=lam, seed=seed, status=status),
                [f"lambda={lam:g}", f"seed={seed}"],
            )
            n += 1
    # same λ and seeds but another epochs: a different setting, not merged into λ=1
    for seed, a in enumerate([0.1, 0.3]):
        _job(
            tmp_path,
            f"{n}_epochs=5,lambda=1,seed={seed}",
            _metrics(a, lam=1.0, seed=seed),
            ["epochs=5", "lambda=1", f"seed={seed}"],
        )
        n += 1
    rows = sweep.collect(tmp_path)
    sweep.write_summary(tmp_path, rows)
    grouped = _read_csv(tmp_path / "summary_grouped.csv")
    assert len(grouped) == 3
    g1 = next(g for g in grouped if g["lambda"] == "1.0" and g["other"] == "")
    g10 = next(g for g in grouped if g["lambda"] == "10.0")
    g5 = next(g for g in grouped if g["other"] == "epochs=5")
    assert (g1["n_jobs"], g1["n_ok"], g10["n_jobs"], g10["n_ok"]) == ("3", "3", "3", "2")
    assert float(g1["acc_pct_mean"]) == pytest.approx(100 * statistics.fmean([0.81, 0.77, 0.92]))
    assert float(g1["acc_pct_std"]) == pytest.approx(100 * statistics.stdev([0.81, 0.77, 0.92]))  # n - 1
    assert float(g10["acc_pct_mean"]) == pytest.approx(62.0) and float(g10["acc_pct_std"]) == pytest.approx(2.82842712)
    assert float(g5["acc_pct_mean"]) == pytest.approx(20.0)
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
    assert len(cb.rows) == 5 and sweep.sweep_status(cb.rows) == 1  # for cl-run's exit code

    def broken(*a, **k):
        raise RuntimeError("disk full\nsecond line")

    monkeypatch.setattr(sweep, "write_summary", broken)
    cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(mixed_sweep)}}}))
    err = capsys.readouterr().err
    assert "summary: could not summarize the sweep: RuntimeError: disk full second line" in err
    assert sweep.sweep_status(cb.rows) == 1  # the exit status does not depend on writing the files
    cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(mixed_sweep / "nope")}}}))
    cb.on_multirun_end(OmegaConf.create({}))  # no hydra node at all
    assert "does not exist" in capsys.readouterr().err


def test_summarize_script(mixed_sweep, tmp_path):
    script = REPO / "scripts" / "summarize.py"
    (mixed_sweep / "summary.csv").unlink(missing_ok=True)
    res = subprocess.run([sys.executable, str(script), str(mixed_sweep)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr  # a failed and a missing job
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
    assert cfg.hydra.callbacks.summary._target_ == "cl_runner.report.summary.SummaryCallback"


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
    assert [j.name for j in jobs] == [f"{i}_lambda={lam}" for i, lam in enumerate(["0.1", "1", "10"])]  # what varies
    table = _read_csv(out / "summary.csv")
    assert len(table) == 3 and (out / "summary.md").is_file()
    assert "Sweep summary: 3 jobs: 3 ok, 0 failed" in res.stdout
    for job, line in zip(jobs, table, strict=True):
        data = json.loads((job / "metrics.json").read_text())
        assert line["job"] == job.name and line["status"] == "ok"
        assert float(line["acc_pct"]) == pytest.approx(100 * data["acc"]) and float(line["lambda"]) == data["lambda"]
        # the run's HParams session, read back from its event files (sub-run <job>/hparams)
        acc = EventAccumulator(str(job / "hparams"), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
        acc.Reload()
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        assert start.hparams["lambda"].number_value == pytest.approx(data["lambda"])
        assert start.hparams["method"].string_value == "l2"
        assert acc.Scalars("hparam/acc")[0].value == pytest.approx(100 * data["acc"], abs=1e-4)
        main = EventAccumulator(str(job), size_guidance={"images": 0})
        main.Reload()
        assert "accuracy_matrix/heatmap" in main.Tags()["images"]
    # pointed at the sweep directory, the HParams dashboard lists the three runs together
    from test_tb_extras import _hparams_dashboard

    exp, groups = _hparams_dashboard(out)
    sessions = {s.name for g in groups for s in g.sessions}
    assert sessions == {f"{j.name}/hparams" for j in jobs}
    assert {g.name for g in groups} == {f"{j.name} ({out.name})" for j in jobs}  # readable trial names
    assert (out / "tradeoff.png").is_file()  # λ varies
    assert (
        res.stdout.strip().splitlines()[-2]
        == f"summary: {out.resolve() / 'summary.md'} (also summary.csv, tradeoff.png)"
    )
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
    _cl_run(
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "method=finetune",
        "epochs=1,0",
        *fast,
        f"hydra.sweep.dir={out}",
        code=1,
    )
    table = _read_csv(out / "summary.csv")
    assert [(t["num"], t["status"]) for t in table] == [("0", "ok"), ("1", "failed")]
    assert "epochs" in table[1]["error"] and table[1]["acc_pct"] == ""
    assert float(table[0]["acc_pct"]) == pytest.approx(
        100 * json.loads((out / table[0]["job"] / "metrics.json").read_text())["acc"]
    )
    md = (out / "summary.md").read_text()
    assert "2 jobs: 1 ok, 1 failed" in md and "(failed): epochs must be a positive integer" in md


@pytest.mark.slow
def test_submitit_local_sweep_is_summarized(tmp_path):
    _needs("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")
    out = tmp_path / "sweep"
    _cl_run(
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        "seed=0,1",
        *FAST,
        f"hydra.sweep.dir={out}",
        timeout=400,
    )
    jobs = _job_folders(out)
    assert len(jobs) == 2 and (out / ".submitit").is_dir()
    table = _read_csv(out / "summary.csv")
    assert [t["seed"] for t in table] == ["0", "1"] and all(t["status"] == "ok" for t in table)
    for job, line in zip(jobs, table, strict=True):
        assert float(line["acc_pct"]) == pytest.approx(100 * json.loads((job / "metrics.json").read_text())["acc"])
    grouped = _read_csv(out / "summary_grouped.csv")  # two seeds of one setting
    assert len(grouped) == 1 and grouped[0]["n_ok"] == "2"


# ----------------------------------------------------------------------------- issue 9: what was swept
@pytest.mark.slow
def test_swept_key_is_a_column_and_folders_are_named_by_what_varies(tmp_path):
    """The two jobs differ only in method.fisher_labels: it gets a column in summary.csv, summary.md
    and the printed table; the folders are named by it; the last line names the summary."""
    out = tmp_path / "sweep"
    res = _cl_run(
        "method=ewc",
        "lambda=1",
        "method.fisher_labels=pred,all",
        "epochs=1",
        "threads=1",
        "benchmark.n_tasks=2",
        "device=cpu",
        f"hydra.sweep.dir={out}",
    )
    assert [j.name for j in _job_folders(out)] == ["0_method.fisher_labels=pred", "1_method.fisher_labels=all"]
    table = _read_csv(out / "summary.csv")
    assert [t["method.fisher_labels"] for t in table] == ["pred", "all"]
    for t in table:  # the column holds what the job really ran with
        data = json.loads((out / t["job"] / "metrics.json").read_text())
        assert data["method_options"]["fisher_labels"] == t["method.fisher_labels"]
    md = (out / "summary.md").read_text()
    assert "| method.fisher_labels |" in md.splitlines()[4] and "| pred |" in md and "| all |" in md
    header = next(line for line in res.stdout.splitlines() if "method.fisher_labels" in line and "ACC %" in line)
    assert header.index("method.fisher_labels") < header.index("ACC %")  # the printed table's header row
    assert res.stdout.strip().splitlines()[-2].startswith(f"summary: {out.resolve() / 'summary.md'}")
    # rebuilding: same table, exit code 0 (all ok); a job folder removed → a missing row named like it
    summary = subprocess.run(
        [sys.executable, "-m", "cl_runner.report.summary", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert summary.returncode == 0, summary.stderr
    import shutil

    shutil.rmtree(out / "1_method.fisher_labels=all")
    rows = sweep.collect(out)
    assert [(r["num"], r["job"], r["status"]) for r in rows] == [
        (0, "0_method.fisher_labels=pred", "ok"),
        (1, "1_method.fisher_labels=all", "missing"),
    ]
    assert rows[1]["method"] == "ewc" and sweep.swept_value(rows[1], "method.fisher_labels") == "all"
    summary = subprocess.run(
        [sys.executable, "-m", "cl_runner.report.summary", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert summary.returncode == 1


def test_swept_keys_only_those_that_vary(tmp_path):
    for n, (labels, epochs) in enumerate([("pred", 3), ("all", 3), ("pred", 5)]):
        _job(
            tmp_path,
            f"{n}_x",
            _metrics(0.5 + n / 10, method="ewc", method_options={"fisher_labels": labels}),
            ["method=ewc", "lambda=1", f"method.fisher_labels={labels}", f"epochs={epochs}", "threads=1", "seed=0"],
        )
    rows = sweep.collect(tmp_path)
    assert sweep.swept_keys(rows) == ["epochs", "method.fisher_labels"]  # not lambda (own column), threads, seed
    sweep.write_summary(tmp_path, rows)
    table = _read_csv(tmp_path / "summary.csv")
    assert [(t["method.fisher_labels"], t["epochs"]) for t in table] == [("pred", "3"), ("all", "3"), ("pred", "5")]
    assert "threads" not in table[0]


# ----------------------------------------------------------------------------- issue 8: statuses, missing jobs
def test_statuses_are_kept_counted_and_only_ok_rows_are_averaged(tmp_path):
    statuses = ["ok", "ok", "diverged", "interrupted", "cancelled", "timeout", "bogus"]
    for seed, st in enumerate(statuses):
        m = _metrics(0.5 + seed / 100, seed=seed, status=st, error=None if st == "ok" else f"{st} happened")
        if st == "diverged":  # keeps its finished rows; metrics null
            m.update(acc=None, bwt=None, accuracy_matrix=[[0.9, 0.1]])
        _job(tmp_path, f"{seed}_seed={seed}", m, [f"seed={seed}"])
    _job(tmp_path, "7_seed=7", None, ["seed=7"])
    rows = sweep.collect(tmp_path)
    assert [r["status"] for r in rows] == [
        "ok",
        "ok",
        "diverged",
        "interrupted",
        "cancelled",
        "timeout",
        "failed",
        "missing",
    ]
    assert "unknown status 'bogus'" not in (rows[6]["error"] or "")  # its own error is kept
    assert sweep.sweep_status(rows) == 1 and sweep.sweep_status(rows[:2]) == 0 and sweep.sweep_status([]) == 1
    (g,) = [g for g in sweep.group(rows) if g["method"] == "l2"]  # the missing job has no identity
    assert g["n_ok"] == 2 and g["acc_mean"] == pytest.approx((0.50 + 0.51) / 2)  # interrupted 0.53 etc. left out
    sweep.write_summary(tmp_path, rows, figure=False)
    md = (tmp_path / "summary.md").read_text()
    assert "8 jobs: 2 ok, 1 failed, 1 diverged, 1 interrupted, 1 cancelled, 1 timeout, 1 missing" in md
    assert "`2_seed=2` (diverged): diverged happened" in md
    assert {t["status"] for t in _read_csv(tmp_path / "summary.csv")} == set(sweep.STATUSES)


def _multirun_yaml(root: Path, task: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text(
        yaml.safe_dump(
            {
                "hydra": {
                    "overrides": {"task": task, "hydra": []},
                    "sweeper": {"params": None},
                    "job": {"config": {"override_dirname": {"exclude_keys": ["data_dir", "device"]}}},
                }
            }
        )
    )


def test_jobs_that_never_started_are_missing_rows_from_multirun_yaml(tmp_path):
    _multirun_yaml(tmp_path, ["method=l2", "lambda=1,10", "seed=range(3)", "device=cpu"])
    from cl_runner.identity import sweep_jobs

    jobs = sweep_jobs(tmp_path / "multirun.yaml")
    assert jobs[:2] == [
        ["method=l2", "lambda=1", "seed=0", "device=cpu"],
        ["method=l2", "lambda=1", "seed=1", "device=cpu"],
    ]
    assert len(jobs) == 6
    # jobs 0 and 4 ran (folder names need not match: jobs are matched by their overrides)
    _job(tmp_path, "0_whatever", _metrics(0.8, seed=0), jobs[0])
    _job(tmp_path, "4_lambda=10,seed=1", _metrics(0.7, lam=10.0, seed=1), jobs[4])
    rows = sweep.collect(tmp_path)
    assert [(r["num"], r["status"]) for r in rows] == [
        (0, "ok"),
        (1, "missing"),
        (2, "missing"),
        (3, "missing"),
        (4, "ok"),
        (5, "missing"),
    ]
    missing = {r["num"]: r for r in rows if r["status"] == "missing"}
    assert missing[5]["job"] == "5_lambda=10,seed=2" and missing[1]["job"] == "1_lambda=1,seed=1"
    assert (missing[5]["method"], missing[5]["lambda"], missing[5]["seed"]) == ("l2", 10, 2)
    assert "never started" in missing[5]["error"]
    assert sweep.main([str(tmp_path), "--quiet"]) == 1


def test_null_metrics_are_blank_never_zero_and_notes_say_why(tmp_path):
    m = _metrics(0.97, method="joint", lam=None, method_options={"mode": "all"})
    m.update(
        bwt=None, forgetting=None, learning_accuracy=None, metric_notes={"bwt": "mode=all trains only at the last task"}
    )
    _job(tmp_path, "0_method=joint", m, ["method=joint"])
    rows = sweep.collect(tmp_path)
    sweep.write_summary(tmp_path, rows, figure=False)
    (line,) = _read_csv(tmp_path / "summary.csv")
    assert (line["bwt_pct"], line["forgetting_pct"], line["learning_accuracy_pct"]) == ("", "", "")
    md = (tmp_path / "summary.md").read_text()
    row = next(x for x in md.splitlines() if x.startswith("| 0 |"))
    assert "| 97.00 |  |" in row and "0.00" not in row
    assert "bwt: mode=all trains only at the last task" in md


# ----------------------------------------------------------------------------- intransigence
J = [[0.95, 0.30], [0.93, 0.90]]  # joint (cumulative) reference: diagonal 0.95, 0.90


def _with_matrix(acc, matrix, **kw):
    m = _metrics(acc, **kw)
    m["accuracy_matrix"] = matrix
    return m


def test_intransigence_against_the_joint_job_of_the_same_seed(tmp_path):
    n = 0
    for seed in (0, 1):
        _job(
            tmp_path,
            f"{n}_method=joint,seed={seed}",
            _with_matrix(
                0.9,
                [[0.95, 0.3], [0.93, 0.90 - seed / 10]],
                method="joint",
                lam=None,
                seed=seed,
                method_options={"mode": "cumulative"},
            ),
            ["method=joint", f"seed={seed}"],
        )
        n += 1
        _job(
            tmp_path,
            f"{n}_method=ewc,seed={seed}",
            _with_matrix(0.7, [[0.85, 0.2], [0.6, 0.70]], method="ewc", seed=seed),
            ["method=ewc", f"seed={seed}"],
        )
        n += 1
    rows = sweep.collect(tmp_path)
    by = {(r["method"], r["seed"]): r for r in rows}
    # mean over tasks of joint[k][k] - R[k][k]
    assert by[("ewc", 0)]["intransigence"] == pytest.approx(((0.95 - 0.85) + (0.90 - 0.70)) / 2)
    assert by[("ewc", 1)]["intransigence"] == pytest.approx(((0.95 - 0.85) + (0.80 - 0.70)) / 2)
    assert by[("joint", 0)]["intransigence"] == 0.0
    sweep.write_summary(tmp_path, rows, figure=False)
    table = _read_csv(tmp_path / "summary.csv")
    assert float(table[1]["intransigence_pct"]) == pytest.approx(15.0)
    assert "intransigence %" in (tmp_path / "summary.md").read_text()


def test_intransigence_is_absent_without_a_cumulative_joint_reference(tmp_path):
    _job(
        tmp_path,
        "0_a",
        _with_matrix(0.9, J, method="joint", lam=None, method_options={"mode": "all"}),
        ["method=joint"],
    )
    _job(tmp_path, "1_b", _with_matrix(0.7, [[0.85, 0.2], [0.6, 0.7]], method="ewc"), ["method=ewc"])
    _job(tmp_path, "2_c", _with_matrix(0.7, [[0.85, 0.2], [0.6, 0.7]], method="ewc", seed=5), ["method=ewc", "seed=5"])
    rows = sweep.collect(tmp_path)
    assert all(r["intransigence"] is None for r in rows)
    sweep.write_summary(tmp_path, rows, figure=False)
    assert "intransigence_pct" not in _read_csv(tmp_path / "summary.csv")[0]
    # the joint jobs of another sweep, given with --joint
    ref = tmp_path.parent / "joint_sweep"
    _job(
        ref,
        "0_seed=0",
        _with_matrix(0.9, J, method="joint", lam=None, method_options={"mode": "cumulative"}),
        ["method=joint"],
    )
    assert sweep.main([str(tmp_path), "--joint", str(ref), "--quiet"]) == 0
    table = _read_csv(tmp_path / "summary.csv")
    assert table[1]["intransigence_pct"] != "" and table[2]["intransigence_pct"] == ""  # seed 5 has no reference


# ----------------------------------------------------------------------------- the trade-off figure
def _lambda_sweep(root: Path, lambdas=(0.0, 10.0, 1000.0), seeds=(0, 1)):
    n = 0
    for lam in lambdas:
        for seed in seeds:
            _job(
                root,
                f"{n}_lambda={lam:g},seed={seed}",
                _metrics(0.6 + lam / 1e4 + seed / 100, method="ewc", lam=lam, seed=seed),
                ["method=ewc", f"lambda={lam:g}", f"seed={seed}"],
            )
            n += 1
    for seed in seeds:
        _job(
            root,
            f"{n}_method=finetune,seed={seed}",
            _metrics(0.55, method="finetune", lam=None, seed=seed),
            ["method=finetune", f"seed={seed}"],
        )
        n += 1


def test_tradeoff_data_mean_std_per_lambda_and_reference_lines(tmp_path):
    _lambda_sweep(tmp_path)
    series, refs, n_seeds = sweep.tradeoff_data(sweep.collect(tmp_path))
    assert list(series) == ["ewc"] and list(refs) == ["finetune"] and n_seeds == 2
    points = series["ewc"]
    assert [lam for lam, _ in points] == [0.0, 10.0, 1000.0]
    mean, std = points[2][1]["acc"]
    accs = [100 * (0.6 + 0.1 + s / 100) for s in (0, 1)]
    assert mean == pytest.approx(statistics.fmean(accs)) and std == pytest.approx(statistics.stdev(accs))
    assert points[0][1]["learning_accuracy"] == (pytest.approx(90.0), 0.0)
    assert refs["finetune"]["acc"] == (pytest.approx(55.0), 0.0)


def test_tradeoff_figure_in_the_sweep_folder_and_tensorboard(tmp_path):
    _lambda_sweep(tmp_path)
    rows = sweep.collect(tmp_path)
    sweep.write_summary(tmp_path, rows)
    png = tmp_path / "tradeoff.png"
    from PIL import Image

    assert Image.open(png).size[0] >= 1000
    assert "![ACC, BWT and learning accuracy against λ](tradeoff.png)" in (tmp_path / "summary.md").read_text()
    fig = sweep._tradeoff(rows)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["ACC (%)", "BWT (%)", "learning accuracy (%)"]
    ax = fig.axes[0]
    assert ax.get_xscale() == "symlog"  # λ = 0 is kept, at the left
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "10", "1000"]
    assert {line.get_label() for line in ax.lines} >= {"ewc", "finetune (no λ)"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "summary"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("sweep/tradeoff")] == [0]
    sweep.write_summary(tmp_path, rows)  # rebuilt: the old events are replaced, not added to
    assert len(list((tmp_path / "summary").glob("events.out.tfevents.*"))) == 1


def test_no_tradeoff_figure_when_lambda_does_not_vary(tmp_path):
    _lambda_sweep(tmp_path, lambdas=(10.0,))
    (tmp_path / "tradeoff.png").write_text("stale")
    rows = sweep.collect(tmp_path)
    assert sweep.tradeoff_data(rows) is None
    sweep.write_summary(tmp_path, rows)
    assert not (tmp_path / "tradeoff.png").exists()


# ----------------------------------------------------------------------------- job folder names
def test_job_dirname_is_what_varies_and_deterministic():
    from cl_runner.identity import job_dirname, varying_keys

    jobs = [
        ["method=ewc", "lambda=1", "epochs=3", "seed=0"],
        ["method=ewc", "lambda=10", "epochs=3", "seed=0"],
        ["method=si", "lambda=1", "epochs=3", "seed=0"],
    ]
    varying = varying_keys(jobs)
    assert varying == {"method", "lambda"}
    assert job_dirname(2, jobs[2], varying) == "2_lambda=1,method=si"
    assert job_dirname(2, list(reversed(jobs[2])), varying) == "2_lambda=1,method=si"  # order of overrides
    assert job_dirname(0, ["epochs=3", "device=cpu"], set(), {"device"}) == "0_epochs=3"  # nothing varies
    assert job_dirname(0, [], None) == "0"
    assert (
        job_dirname(1, ["model.hidden=[400,400]", "data=a/b"], {"model.hidden", "data"})
        == "1_data=a_b,model.hidden=[400,400]"
    )


def test_cl_run_summary_console_script_is_declared():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["cl-run-summary"] == "cl_runner.report.summary:main"
    assert any(d.startswith("matplotlib") for d in project["dependencies"])
