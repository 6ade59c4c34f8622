"""Faults are results too: divergence, interruption (Ctrl-C, SIGTERM, kill -9) and resume, two
processes on one folder, atomic writes on a full disk, unwritable folders, exit codes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CL_RUN, cl_run, compose_config, defaults

from cl_runner.app import main
from cl_runner.record import read_matrix_csv
from cl_runner.run import run_experiment

# 5 short tasks; interruptions come at controlled points of the run (cl_runner/faults.py), never by
# racing a timer against the run
LONG = ["benchmark=split_digits", "epochs=3", "threads=1"]


def _popen(*args: str, cwd: Path | None = None, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", **({"CL_RUNNER_FAULT": fault} if fault else {})}
    return subprocess.Popen(
        [*CL_RUN, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run that resumed runs must reproduce bitwise."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = cl_run(*LONG, f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    return _metrics(out)


# ----------------------------------------------------------------------------- interruption and resume
def test_kill_9_then_resume_gives_the_same_matrix(tmp_path, reference):
    out = tmp_path / "run"
    # SIGKILL just before task 3's checkpoint: no handler runs, only the checkpoint of task 2 is left
    proc = _popen(*LONG, f"hydra.run.dir={out}", fault="checkpoint@3:kill")
    proc.communicate()
    assert proc.returncode == -9
    assert not (out / "metrics.json").exists()
    done = torch.load(out / "checkpoint.pt", weights_only=False)["trainer"]["tasks_done"]
    assert 1 <= done < 5
    resumed = cl_run(*LONG, f"hydra.run.dir={out}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"tasks 1–{done} of 5 finished" in resumed.stdout
    m = _metrics(out)
    assert m["status"] == "ok" and m["steps"] == reference["steps"]
    assert m["accuracy_matrix"] == reference["accuracy_matrix"]  # bitwise, not approximately
    assert m["initial_accuracy"] == reference["initial_accuracy"]
    assert not (out / "checkpoint.pt").exists()  # removed once the run finished
    # the TensorBoard events of the finished tasks survived the kill: one point per row
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out), size_guidance={"scalars": 0})
    ea.Reload()
    # initial model + one point per finished task, none twice (the resumed writer purges the rest)
    steps = [e.step for e in ea.Scalars("acc/task_1")]
    assert len(steps) == 6 and sorted(set(steps)) == steps
    # and every training step once: the killed attempt's task 3 left nothing behind (its events are
    # held until its checkpoint; a task's first loss sits at the step of the checkpoint before it)
    losses = [e.step for e in ea.Scalars("train/loss")]
    assert losses == list(range(reference["steps"]))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_keeps_finished_rows_then_resumes(tmp_path, reference, sig):
    out = tmp_path / "run"
    # the signal reaches the run in task 3's training, at a controlled point (not a race with a timer)
    proc = _popen(*LONG, f"hydra.run.dir={out}", fault=f"train@3:{'sigint' if sig == signal.SIGINT else 'sigterm'}")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130
    line = _one_error_line(stderr)
    assert "interrupted during task" in line and "run the same command again to resume" in line
    m = _metrics(out)
    assert m["status"] == "interrupted" and m["acc"] is None
    done = len(m["accuracy_matrix"])
    assert 1 <= done < 5 and m["accuracy_matrix"] == reference["accuracy_matrix"][:done]
    initial, rows = read_matrix_csv(out / "accuracy_matrix.csv")
    assert rows == m["accuracy_matrix"] and initial == reference["initial_accuracy"]

    resumed = cl_run(*LONG, f"hydra.run.dir={out}")
    assert resumed.returncode == 0, resumed.stderr
    assert _metrics(out)["accuracy_matrix"] == reference["accuracy_matrix"]


def test_resume_with_another_config_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    proc = _popen(*LONG, f"hydra.run.dir={out}", fault="checkpoint@2:kill")
    proc.communicate()
    before = (out / ".hydra" / "config.yaml").read_text()
    other = cl_run(*LONG, "seed=1", "optimizer.lr=0.01", f"hydra.run.dir={out}")
    assert other.returncode == 2
    line = _one_error_line(other.stderr)
    assert "another config" in line and "seed (0 → 1)" in line and "optimizer.lr (0.0003 → 0.01)" in line
    assert (out / ".hydra" / "config.yaml").read_text() == before  # Hydra never ran
    # the same in-process (the job-side check, as in a sweep)
    with pytest.raises(ValueError, match=r"seed \(0 → 1\)"):
        run_experiment(compose_config(*LONG, "seed=1"), out)


def test_keep_checkpoint_keeps_the_last_one(tmp_path):
    m = run_experiment(compose_config("epochs=1", "keep_checkpoint=true"), tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["trainer"]
    assert state["tasks_done"] == 5 and state["matrix"] == m["accuracy_matrix"]


def test_a_sweep_resumes_where_it_was_interrupted(tmp_path):
    out = tmp_path / "sweep"
    args = ["-m", "seed=0,1,2", *LONG, f"hydra.sweep.dir={out}"]
    # Ctrl-C in the sweep's second job, after that job's first task (the 2nd time any job starts task 2)
    proc = _popen(*args, fault="train@2#2:sigint")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    (job0,) = out.glob("0_*")
    (job1,) = out.glob("1_*")
    assert _metrics(job0)["status"] == "ok" and _metrics(job1)["status"] == "interrupted"
    finished0 = (job0 / "metrics.json").read_text()

    again = subprocess.run([*CL_RUN, *args], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "job 0: already finished" in again.stderr  # skipped, not rerun
    assert "resuming" in again.stdout
    assert (job0 / "metrics.json").read_text() == finished0
    jobs = sorted(out.glob("[0-9]_*"))
    assert [_metrics(j)["status"] for j in jobs] == ["ok", "ok", "ok"]
    # the resumed job equals a run that was never interrupted
    fresh = run_experiment(compose_config(*LONG, "seed=1"), tmp_path / "fresh")
    assert _metrics(job1)["accuracy_matrix"] == fresh["accuracy_matrix"]
    summary = (out / "summary.csv").read_text()
    assert summary.count(",ok,") == 3


def test_a_sweep_into_a_folder_of_another_sweep_is_refused(tmp_path):
    out = tmp_path / "sweep"
    first = subprocess.run(
        [*CL_RUN, "-m", "seed=0,1", "epochs=1", f"hydra.sweep.dir={out}"], capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    other = subprocess.run(
        [*CL_RUN, "-m", "seed=0,1", "epochs=2", f"hydra.sweep.dir={out}"], capture_output=True, text=True
    )
    assert other.returncode == 2 and "holds another sweep" in _one_error_line(other.stderr)


# ----------------------------------------------------------------------------- divergence
def test_divergence_stops_the_run_and_keeps_the_finished_rows(tmp_path):
    # task 1 trains normally; from task 2 on, the penalty's gradient explodes the parameters
    out = tmp_path / "run"
    proc = cl_run(
        "benchmark=split_digits",
        "method=ewc",
        "lambda=1e12",
        "optimizer=sgd",
        "optimizer.lr=0.1",
        "threads=1",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 3
    line = _one_error_line(proc.stderr)
    assert line.startswith("error: diverged: non-finite") and "task 2, step" in line and str(out) in line
    m = _metrics(out)
    assert m["status"] == "diverged" and "task 2" in m["error"]
    assert len(m["accuracy_matrix"]) == 1 and m["accuracy_matrix"][0][0] > 0.9
    assert m["acc"] is None and m["bwt"] is None


def test_a_diverged_job_is_a_row_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [*CL_RUN, "-m", "optimizer=sgd", "optimizer.lr=0.05,1e4", "epochs=2", "threads=1", f"hydra.sweep.dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr  # some job did not end ok
    statuses = sorted(_metrics(j)["status"] for j in out.glob("[0-9]_*"))
    assert statuses == ["diverged", "ok"]
    assert (out / "summary.csv").exists()


# ----------------------------------------------------------------------------- one folder, one run
def test_two_processes_never_share_a_run_folder(tmp_path):
    out = tmp_path / "run"
    procs = [_popen("benchmark=split_digits", "epochs=20", "threads=1", f"hydra.run.dir={out}") for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    loser = results[[p.returncode for p in procs].index(2)][1]
    line = _one_error_line(loser)
    assert "another cl-run" in line or "already holds finished" in line or "already holds a finished" in line
    assert _metrics(out)["status"] == "ok"
    assert len(list(out.glob("events.out.tfevents.*"))) == 1  # one run's events only


def test_default_run_folders_are_unique(tmp_path):
    procs = [_popen("epochs=1", "threads=1", cwd=tmp_path) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    runs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 2 and all(_metrics(r)["status"] == "ok" for r in runs)


# ----------------------------------------------------------------------------- writes
def test_a_full_disk_never_leaves_a_result_that_says_ok(tmp_path):
    cfg = compose_config("epochs=1")
    # the csv is written through a temporary file next to it: make that file /dev/full
    (tmp_path / f".accuracy_matrix.csv.tmp{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(OSError):
        run_experiment(cfg, tmp_path)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "accuracy_matrix.csv").exists()
    assert not list(tmp_path.glob(".*.tmp*"))  # the temporary file was removed
    # the disk has room again: the same run resumes from its last checkpoint and finishes
    m = run_experiment(cfg, tmp_path)
    assert m["status"] == "ok" and _metrics(tmp_path)["accuracy_matrix"] == m["accuracy_matrix"]


def test_full_disk_in_the_app_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / f".metrics.json.tmp{os.getpid()}").symlink_to("/dev/full")
    monkeypatch.setattr(sys, "argv", ["cl-run", "epochs=1", f"hydra.run.dir={out}"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot write results" in line and "No space left on device" in line


@pytest.mark.parametrize("folder", ["/proc/cl-run-test/x", "FILE/x"])
def test_an_impossible_run_folder_is_one_line(tmp_path, folder):
    (tmp_path / "FILE").write_text("")
    folder = folder.replace("FILE", str(tmp_path / "FILE"))
    proc = cl_run("epochs=1", f"hydra.run.dir={folder}")
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert line.startswith("error: hydra.run.dir=") and "cannot create it" in line


# ----------------------------------------------------------------------------- bad input, upfront
UPFRONT = [
    (["lambda=nan"], "lambda must be a finite number"),
    (["method=ewc", "lambda=inf"], "lambda must be a finite number"),
    (["method=ewc", "lambda=1e400"], "lambda must be a finite number"),
    (["optimizer.lr=nan"], "optimizer.lr must be > 0 and finite"),
    (["model.hidden=abc"], "model.hidden='abc' must be a list of positive integers"),
    (["model.hidden=[0]"], "model.hidden=[0] must be a list of positive integers"),
    (["model=cnn"], "model=cnn does not fit the benchmark's input shape 1×8×8"),
    (["lamda=1"], "unknown key 'lamda': did you mean 'lambda'?"),
    (["method=ewc", "method.fisher_lables=all"], "did you mean 'method.fisher_labels'?"),
]


@pytest.mark.parametrize("args,message", UPFRONT, ids=[" ".join(a) for a, _ in UPFRONT])
def test_bad_values_are_refused_before_a_run(tmp_path, monkeypatch, capsys, args, message):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["cl-run", *args, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: ") and message in line
    assert not run_dir.exists()


def test_model_that_does_not_fit_says_what_fits(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["cl-run", "model=cnn", f"hydra.run.dir={tmp_path / 'r'}"])
    with pytest.raises(SystemExit):
        main()
    assert "needs images of at least 16×16: set benchmark.pad=16" in capsys.readouterr().err


def test_cfg_with_an_unknown_option_is_one_line():
    proc = cl_run("--cfg", "job", "method=bogus")
    assert proc.returncode == 2
    assert "method=bogus is not a known method; choose one of:" in _one_error_line(proc.stderr)


def test_a_sweep_with_failed_jobs_exits_1_after_its_summary(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [*CL_RUN, "-m", "method=ewc", "lambda=-1,-2", f"hydra.sweep.dir={out}"], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert (out / "summary.csv").exists() and "failed" in (out / "summary.md").read_text()


def test_unreadable_data_file_says_cannot_read(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist

    from cl_runner.data.datasets import DatasetUnavailable, load_dataset

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"")

    def denied(path, *a, **k):  # what open() raises for a file without read permission
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(tv_mnist, "read_image_file", denied)
    with pytest.raises(DatasetUnavailable, match=r"mnist: cannot read .*train-images-idx3-ubyte: permission denied"):
        load_dataset("mnist", str(tmp_path), False, 0)


# ----------------------------------------------------------------------------- silently wrong numbers
def test_joint_mode_all_reports_meaningless_metrics_as_null(tmp_path):
    m = run_experiment(compose_config("method=joint", "method.mode=all", "epochs=2"), tmp_path)
    assert m["acc"] is not None
    for key in ("bwt", "fwt", "forgetting", "learning_accuracy"):
        assert m[key] is None and "trains only at the last task" in m["metric_notes"][key]


def test_importance_randomness_depends_on_the_run_seed():
    from cl_runner.data.benchmarks import build_stream
    from cl_runner.methods.ewc import EWC
    from cl_runner.models.mlp import MLP

    stream = build_stream({"name": "s", "kind": "split", "dataset": "digits", "n_tasks": 2}, "task", 0, "cpu", ".")
    torch.manual_seed(0)
    model = MLP(stream.input_shape, stream.n_outputs, hidden=[16])

    def fisher(seed):
        ewc = EWC(1.0, **defaults("ewc", fisher_labels="sample", fisher_samples=50))
        ewc.setup(model, stream, seed=seed)
        return ewc.fisher(model, stream[0])

    a, b, a_again = fisher(0), fisher(1), fisher(0)
    assert all(torch.equal(a[n], a_again[n]) for n in a)  # reproducible ...
    assert not all(torch.equal(a[n], b[n]) for n in a)  # ... and not the same draw for every seed


def test_cnn_width_probe_leaves_batch_norm_statistics_alone():
    from cl_runner.models.cnn import SmallCNN

    model = SmallCNN((1, 28, 28), 10, batch_norm=True)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
    assert model.training
