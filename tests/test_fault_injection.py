"""Every run phase, made to fail (cl_runner/faults.py): each ending leaves one record with the status
it should have and the rows finished before it (issue 20: "one place turns any exception inside a
run into a final status with the rows kept"); a signal at a controlled point interrupts, never gets
lost, and the run resumes to the matrix of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config

from cl_runner.run import RunStopped, run_experiment

TINY = [
    "benchmark=split_digits",
    "benchmark.n_tasks=3",
    "benchmark.max_train_per_task=40",
    "benchmark.max_test_per_task=30",
    "epochs=1",
    "batch_size=8",
    "threads=1",
    "model.hidden=[16]",
]

# (fault, status, rows kept, error.log written: a bug's traceback)
CASES = [
    ("setup:raise", "failed", 0, True),
    ("train@1:raise", "failed", 0, True),
    ("train@2:raise", "failed", 1, True),
    ("train@2:nonfinite", "diverged", 1, False),
    ("train@2:sigint", "interrupted", 1, False),
    ("train@3:sigterm", "interrupted", 2, False),
    ("importance@2:raise", "failed", 1, True),
    ("evaluate@2:raise", "failed", 1, True),
    ("evaluate@3:nonfinite", "diverged", 2, False),
    ("checkpoint@2:enospc", "failed", 2, False),
    ("checkpoint@2:sigint", "interrupted", 2, False),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_experiment(compose_config(*TINY, "method=ewc"), tmp_path_factory.mktemp("ref"))


@pytest.mark.parametrize(("fault", "status", "rows", "log"), CASES, ids=[c[0] for c in CASES])
def test_each_phase_fails_into_a_record_with_its_rows(tmp_path, monkeypatch, reference, fault, status, rows, log):
    monkeypatch.setenv("CL_RUNNER_FAULT", fault)
    with pytest.raises(RunStopped) as stopped:
        run_experiment(compose_config(*TINY, "method=ewc"), tmp_path)
    assert stopped.value.status == status
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == status and m["tasks_done"] == rows and m["error"]
    assert m["accuracy_matrix"] == reference["accuracy_matrix"][:rows]  # the finished rows, exactly
    assert m["acc"] is None and m["method"] == "ewc"
    assert (tmp_path / "error.log").is_file() == log
    monkeypatch.delenv("CL_RUNNER_FAULT")
    if status == "diverged":  # final: never run again
        return
    # the same command again (fault gone) resumes and ends with the uninterrupted run's matrix
    again = run_experiment(compose_config(*TINY, "method=ewc"), tmp_path)
    assert again["status"] == "ok" and again["accuracy_matrix"] == reference["accuracy_matrix"]


def test_a_write_that_fails_leaves_no_record_that_says_ok(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_RUNNER_FAULT", "record:enospc")
    with pytest.raises(OSError, match="No space left"):
        run_experiment(compose_config(*TINY), tmp_path)
    assert not (tmp_path / "metrics.json").exists() and (tmp_path / "checkpoint.pt").is_file()


def test_a_signal_while_the_results_are_written_waits_for_them(tmp_path, monkeypatch):
    """Ctrl-C after the record was written (and SIGTERM at the same point): the record is complete
    and says ok; the run says the signal came while its results were written."""
    for sig in ("sigint", "sigterm"):
        folder = tmp_path / sig
        monkeypatch.setenv("CL_RUNNER_FAULT", f"written:{sig}")
        with pytest.raises(RunStopped, match="received while the results were written; they are complete") as e:
            run_experiment(compose_config(*TINY), folder)
        assert e.value.status == "ok"
        m = json.loads((folder / "metrics.json").read_text())
        assert m["status"] == "ok" and m["tasks_done"] == 3 and m["acc"] is not None
        assert not (folder / "checkpoint.pt").exists()


def test_a_swallowed_signal_still_stops_the_run(tmp_path, monkeypatch):
    """A Ctrl-C whose KeyboardInterrupt was discarded (raised inside a finalizer, where Python prints
    "Exception ignored" and goes on) is still recorded: the run stops at its next check."""
    from cl_runner import stopping
    from cl_runner.trainer import Trainer

    real = Trainer.train_task

    def swallowed(self, request):
        if request.t == 1:
            try:
                stopping._raise(2, None)  # the handler, as the signal would run it...
            except KeyboardInterrupt:
                pass  # ...inside a __del__ that swallows it
        return real(self, request)

    monkeypatch.setattr(Trainer, "train_task", swallowed)
    with pytest.raises(RunStopped) as e:
        run_experiment(compose_config(*TINY), tmp_path)
    assert e.value.status == "interrupted"
    assert json.loads((tmp_path / "metrics.json").read_text())["tasks_done"] == 1
