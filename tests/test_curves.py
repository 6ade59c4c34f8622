"""``eval_every: epoch``: every task's test accuracy and loss after every epoch, in curves.csv and in
TensorBoard (read back), the accuracy matrix unchanged; the loss against a per-sample brute force."""

from __future__ import annotations

import contextlib
import csv
import io

import pytest
import torch
from conftest import cl_run, compose_config

from cl_runner.data.benchmarks import build_stream
from cl_runner.models import build_model
from cl_runner.run import run_experiment
from cl_runner.trainer import evaluate, evaluate_with_loss

RUN = ["benchmark=split_digits", "benchmark.n_tasks=3", "scenario=class", "epochs=2", "batch_size=64", "threads=1"]


def _run(tmp_path, *extra):
    cfg = compose_config(*RUN, *extra)
    with contextlib.redirect_stdout(io.StringIO()):
        return run_experiment(cfg, tmp_path)


def test_curves_csv_and_tensorboard_after_every_epoch(tmp_path):
    per_task = _run(tmp_path / "task", "method=replay")
    assert not (tmp_path / "task" / "curves.csv").exists()
    out = tmp_path / "epoch"
    result = _run(out, "method=replay", "eval_every=epoch")
    assert result["accuracy_matrix"] == per_task["accuracy_matrix"]  # rows stay "after task i"
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["task_trained", "epoch", "step", "task", "accuracy", "loss"]
    assert len(rows) == 3 * 2 * 3  # tasks trained × epochs × tasks evaluated
    steps_per_epoch = [-(-n // 64) for n in (len(t) for t in _train_sizes())]
    end = 0
    for t in range(3):
        for e in range(2):
            end += steps_per_epoch[t]
            got = [r for r in rows if (int(r["task_trained"]), int(r["epoch"])) == (t + 1, e + 1)]
            assert [int(r["task"]) for r in got] == [1, 2, 3]
            assert {int(r["step"]) for r in got} == {end}
            assert all(0 <= float(r["accuracy"]) <= 1 and float(r["loss"]) > 0 for r in got)
        # the last epoch of task t is the model the matrix row was measured on
        last = [float(r["accuracy"]) for r in rows if (int(r["task_trained"]), int(r["epoch"])) == (t + 1, 2)]
        assert last == pytest.approx(result["accuracy_matrix"][t], abs=1e-7)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out), size_guidance={"scalars": 0})
    ea.Reload()
    for j in (1, 2, 3):
        mine = [r for r in rows if int(r["task"]) == j]
        acc = ea.Scalars(f"epoch/acc_task_{j}")
        loss = ea.Scalars(f"epoch/loss_task_{j}")
        assert [e.step for e in acc] == [int(r["step"]) for r in mine] == [e.step for e in loss]
        assert [e.value for e in acc] == pytest.approx([100 * float(r["accuracy"]) for r in mine], rel=1e-5)
        assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in mine], rel=1e-5)


def _train_sizes():
    cfg = compose_config(*RUN)
    stream = build_stream(cfg.benchmark, cfg.scenario, 0, "cpu", ".")
    return [t.y_train for t in stream]


def test_test_loss_is_the_mean_cross_entropy_over_the_eval_units():
    cfg = compose_config(*RUN)
    stream = build_stream(cfg.benchmark, cfg.scenario, 0, "cpu", ".")
    torch.manual_seed(0)
    model = build_model(cfg.model, stream.input_shape, stream.n_outputs)
    accs, losses = evaluate_with_loss(model, stream, 1, batch_size=7)
    assert accs == evaluate(model, stream, 1)
    for j, task in enumerate(stream):
        lo, hi = stream.eval_units(1, j)
        with torch.no_grad():
            brute = [
                torch.nn.functional.cross_entropy(model(x[None])[:, lo:hi], y[None] - lo).item()
                for x, y in zip(task.x_test, task.y_test, strict=True)
            ]
        assert losses[j] == pytest.approx(sum(brute) / len(brute), rel=1e-5)


def test_a_bad_eval_every_is_one_line(tmp_path):
    proc = cl_run("eval_every=step", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: eval_every='step' is unknown; choose one of: task, epoch"
    assert not (tmp_path / "run").exists()
