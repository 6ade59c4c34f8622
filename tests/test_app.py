"""End to end: the app composes, runs, writes files and TensorBoard events that agree; bad input
is one line and a non-zero exit."""

import json

import pytest
from conftest import cl_run, compose_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from cl_runner.record import read_matrix_csv
from cl_runner.run import run_experiment


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    proc = cl_run("epochs=3", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_run_writes_consistent_files(finished_run):
    out, proc = finished_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "ok"
    assert (m["method"], m["benchmark"], m["scenario"], m["seed"]) == ("finetune", "permuted_digits", "domain", 0)
    R = m["accuracy_matrix"]
    assert len(R) == 5 and all(len(r) == 5 for r in R)
    assert m["acc"] == pytest.approx(sum(R[-1]) / 5)
    initial, csv_matrix = read_matrix_csv(out / "accuracy_matrix.csv")
    assert csv_matrix == R and initial == m["initial_accuracy"]
    assert (out / ".hydra" / "config.yaml").exists() and (out / "config_resolved.yaml").exists()
    # the terminal shows the matrix and the metrics
    assert "Accuracy matrix" in proc.stdout and f"{100 * m['acc']:.2f}" in proc.stdout


def test_tensorboard_events_hold_the_same_matrix(finished_run):
    out, _ = finished_run
    m = json.loads((out / "metrics.json").read_text())
    # events in the run folder itself (TensorBoard names the run after it), percent, step = optimizer steps
    ea = EventAccumulator(str(out), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    ea.Reload()
    R = m["accuracy_matrix"]
    per_task = m["steps"] // 5  # the five tasks of the default stream have the same number of steps
    for j in range(5):
        events = ea.Scalars(f"acc/task_{j + 1}")
        assert [e.step for e in events] == [0] + [per_task * (i + 1) for i in range(5)]
        assert [e.value for e in events] == pytest.approx(
            [100 * m["initial_accuracy"][j]] + [100 * R[i][j] for i in range(5)], abs=1e-4
        )
    hp = EventAccumulator(str(out / "hparams"), size_guidance={"scalars": 0})
    hp.Reload()
    assert hp.Scalars("hparam/acc")[-1].value == pytest.approx(100 * m["acc"], abs=1e-4)
    assert hp.Scalars("hparam/bwt")[-1].value == pytest.approx(100 * m["bwt"], abs=1e-4)
    assert len(ea.Scalars("train/loss")) == m["steps"]
    assert len(ea.Scalars("train/penalty")) == m["steps"]
    text = make_ndarray(ea.Tensors("accuracy_matrix/text_summary")[-1].tensor_proto).item().decode()
    assert f"{100 * R[4][0]:.2f}" in text and text.count("| T") >= 5


def test_run_ends_by_naming_its_folder(finished_run):
    out, proc = finished_run
    last = proc.stdout.strip().splitlines()[-2:]
    assert last[0] == f"results (ok): {out}" and last[1].strip() == f"tensorboard --logdir {out}"


def test_help_lists_groups_and_options():
    proc = cl_run("--help")
    assert proc.returncode == 0
    for word in (
        "benchmark:",
        "method:",
        "model:",
        "optimizer:",
        "split_digits",
        "permuted_digits",
        "finetune",
        "adam",
    ):
        assert word in proc.stdout


def _run(tmp_path, *overrides):
    cfg = compose_config(*overrides)
    return run_experiment(cfg, tmp_path / "_".join(overrides or ("default",)).replace("=", "-"))


def test_same_seed_same_matrix_other_seed_other_matrix(tmp_path):
    a = _run(tmp_path, "epochs=2", "seed=3")
    b = _run(tmp_path / "b", "epochs=2", "seed=3")
    c = _run(tmp_path, "epochs=2", "seed=4")
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["initial_accuracy"] == b["initial_accuracy"]
    assert a["accuracy_matrix"] != c["accuracy_matrix"]


@pytest.mark.parametrize("seed", [0, 1])
def test_finetune_forgets_on_split_digits_domain_il(tmp_path, seed):
    m = _run(tmp_path, f"seed={seed}", "scenario=domain", "benchmark=split_digits", "optimizer=adam")
    R = m["accuracy_matrix"]
    assert R[0][0] > 0.95  # the first task was learned ...
    assert R[0][0] - R[-1][0] > 0.15  # ... and then clearly forgotten
    assert m["bwt"] < -0.05


def test_class_il_finetune_forgets_everything_but_the_last_task(tmp_path):
    R = _run(tmp_path, "scenario=class", "epochs=5", "benchmark=split_digits", "optimizer=adam")["accuracy_matrix"]
    assert all(a < 0.1 for a in R[-1][:-1]) and R[-1][-1] > 0.9


def test_task_il_iterations_and_optimizer_reset(tmp_path):
    m = _run(tmp_path, "scenario=task", "iterations=7", "reset_optimizer=true", "optimizer=sgd")
    assert m["steps"] == 35 and m["optimizer"] == "sgd"


def test_a_finished_run_is_never_overwritten(tmp_path):
    cfg = compose_config("epochs=1")
    run_experiment(cfg, tmp_path)
    before = (tmp_path / "metrics.json").read_text()
    with pytest.raises(ValueError, match="already holds a finished run"):
        run_experiment(cfg, tmp_path)
    assert (tmp_path / "metrics.json").read_text() == before


BAD_INPUT = [
    (["method=foo"], "method=foo is not a known method; choose one of:"),
    (["benchmark=nope"], "benchmark=nope is not a known benchmark; choose one of:"),
    (["foo=1"], "unknown key 'foo'"),
    (["epochs=abc"], "epochs must be a positive integer, got 'abc'"),
    (["epochs=0"], "epochs must be a positive integer, got 0"),
    (["batch_size=-3"], "batch_size must be a positive integer, got -3"),
    (["lambda=-1"], "lambda must be >= 0, got -1"),
    (["scenario=bogus"], "scenario='bogus' is unknown; choose one of: task, domain, class"),
    (["method=finetune", "lambda=5"], "method=finetune has no regularization strength"),
    (["optimizer.lr=-1"], "optimizer.lr must be > 0"),
    (["active_units=all"], "active_units=all applies to scenario=class only"),
    (["scenario=class", "active_units=some"], "active_units='some' is unknown; choose one of: seen, all"),
    (["clip_grad_norm=0"], "clip_grad_norm must be a number > 0 (or null: no clipping), got 0"),
    (["clip_grad_norm=nan"], "clip_grad_norm must be a number > 0"),
]


def _check_one_line(stderr, stdout, message):
    assert "Traceback" not in stderr + stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and message in lines[0]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_non_zero_exit(tmp_path, monkeypatch, capsys, args, message):
    from cl_runner.app import main

    run_dir = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["cl-run", *args, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    _check_one_line(captured.err, captured.out, message)
    assert not run_dir.exists()  # refused before Hydra made the run directory


@pytest.mark.parametrize("args,message", BAD_INPUT[:1] + BAD_INPUT[3:4], ids=["group", "type"])
def test_bad_input_from_the_shell(tmp_path, args, message):
    proc = cl_run(*args, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    _check_one_line(proc.stderr, proc.stdout, message)


def test_finished_run_directory_is_refused_before_anything_is_written(finished_run):
    out, _ = finished_run
    before = (out / ".hydra" / "config.yaml").read_text()
    proc = cl_run("seed=5", f"hydra.run.dir={out}")
    assert proc.returncode == 2 and "already holds finished results" in proc.stderr
    assert (out / ".hydra" / "config.yaml").read_text() == before


@pytest.mark.parametrize(
    ("argv", "code", "stderr"),
    [(["method=nope"], 2, "error: method=nope is not a known method"), (["--help"], 0, "")],
)
def test_console_script_exits_quickly_with_the_exit_handlers_run(tmp_path, argv, code, stderr):
    """`cl-run` (app.cli) skips the interpreter's teardown: same exit code and messages as main(),
    the exit handlers (logging's flush among them) and buffered output still reach their files."""
    import subprocess
    import sys

    script = (
        "import atexit, sys\n"
        "from cl_runner import app\n"
        "atexit.register(lambda: print('exit handler ran'))\n"
        "print('buffered', end='')\n"
        f"sys.argv = ['cl-run', *{argv!r}]\n"
        "app.cli()\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert stderr in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout.startswith("buffered") and proc.stdout.rstrip().endswith("exit handler ran")
    assert "not reached" not in proc.stdout
