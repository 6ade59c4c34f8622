"""A run folder cannot run code, cannot be taken over from another program, and a damaged one keeps
its rows and says the way out (issue 20). In-process `cl-run` (``cl_runner.app.main``) on tiny runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from cl_runner.app import main

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


def _cl_run(monkeypatch, capsys, *args: str, fault: str | None = None) -> tuple[int, str]:
    if fault:
        monkeypatch.setenv("CL_RUNNER_FAULT", fault)
    else:
        monkeypatch.delenv("CL_RUNNER_FAULT", raising=False)
    monkeypatch.setattr(sys, "argv", ["cl-run", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.fixture
def interrupted(tmp_path, monkeypatch, capsys):
    """A run interrupted in task 3 (2 finished rows, a checkpoint and the one before it)."""
    out = tmp_path / "run"
    code, _ = _cl_run(monkeypatch, capsys, *TINY, f"hydra.run.dir={out}", fault="train@3:sigint")
    assert code == 130 and _metrics(out)["tasks_done"] == 2
    assert (out / "checkpoint.pt").is_file() and (out / "checkpoint.prev.pt").is_file()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import compose_config

    from cl_runner.run import run_experiment

    return run_experiment(compose_config(*TINY), tmp_path_factory.mktemp("ref"))


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_never_run(interrupted, monkeypatch, capsys):
    marker = interrupted / "payload_ran"
    torch.save({"trainer": _Payload(str(marker))}, interrupted / "checkpoint.pt")
    before = (interrupted / "metrics.json").read_text()
    code, err = _cl_run(monkeypatch, capsys, *TINY, f"hydra.run.dir={interrupted}")
    line = _error_line(err)
    assert code == 2 and "cannot be read safely" in line and "nothing in it was run" in line
    assert not marker.exists()
    assert (interrupted / "metrics.json").read_text() == before  # the rows are kept


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "empty", "foreign"])
def test_a_damaged_checkpoint_keeps_the_rows_and_says_the_way_out(interrupted, monkeypatch, capsys, reference, damage):
    path = interrupted / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(
        {
            "corrupt": data[:100] + bytes(200) + data[300:],
            "truncated": data[: len(data) // 2],
            "empty": b"",
            "foreign": b"",
        }[damage]
    )
    if damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    before = (interrupted / "metrics.json").read_text()
    code, err = _cl_run(monkeypatch, capsys, *TINY, f"hydra.run.dir={interrupted}")
    line = _error_line(err)
    assert code == 2 and "resume=previous" in line and "resume=restart" in line and "rows are kept" in line
    assert (interrupted / "metrics.json").read_text() == before  # status interrupted, 2 rows, untouched
    # the way out: from the checkpoint one task earlier, the same matrix as a run never interrupted
    code, err = _cl_run(monkeypatch, capsys, *TINY, "resume=previous", f"hydra.run.dir={interrupted}")
    assert code == 0, err
    m = _metrics(interrupted)
    assert m["status"] == "ok" and m["accuracy_matrix"] == reference["accuracy_matrix"]


def test_resume_restart_trains_every_task_again(interrupted, monkeypatch, capsys, reference):
    (interrupted / "checkpoint.pt").write_bytes(b"garbage")
    code, err = _cl_run(monkeypatch, capsys, *TINY, "resume=restart", f"hydra.run.dir={interrupted}")
    assert code == 0, err
    m = _metrics(interrupted)
    assert m["status"] == "ok" and m["accuracy_matrix"] == reference["accuracy_matrix"]
    assert not (interrupted / "checkpoint.pt").exists()


def test_a_folder_of_another_program_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "metrics.json").write_text('{"accuracy": 0.9}')
    (out / "accuracy_matrix.csv").write_text("their,data\n")
    code, err = _cl_run(monkeypatch, capsys, *TINY, f"hydra.run.dir={out}")
    assert code == 2 and "not a cl-run run" in _error_line(err)
    assert (out / "metrics.json").read_text() == '{"accuracy": 0.9}' and sorted(os.listdir(out)) == [
        "accuracy_matrix.csv",
        "metrics.json",
    ]


@pytest.mark.parametrize(
    ("folder", "says"),
    [("", "hydra.run.dir is empty"), ("x" * 300, "has more than")],
    ids=["empty", "name-too-long"],
)
def test_an_unusable_run_folder_name_is_one_line(tmp_path, monkeypatch, capsys, folder, says):
    monkeypatch.chdir(tmp_path)
    code, err = _cl_run(monkeypatch, capsys, *TINY, f"hydra.run.dir={folder}")
    assert code == 2 and says in _error_line(err)
    assert os.listdir(tmp_path) == []  # nothing was written, not even into the current folder


def test_numbers_that_only_overflow_later_are_refused_or_diverge(tmp_path, monkeypatch, capsys):
    # a damping float32 rounds to 0: refused up front
    code, err = _cl_run(monkeypatch, capsys, *TINY, "method=ng_replay", "method.damping=1e-300")
    assert code == 2 and "method.damping" in _error_line(err)
    # a learning rate that blows the parameters up (the natural gradient then samples labels from a NaN
    # softmax, and torch refuses): diverged, with the finished rows, exit 3
    out = tmp_path / "run"
    args = ["method=ng_replay", "optimizer=sgd", "optimizer.lr=1e10", f"hydra.run.dir={out}"]
    code, err = _cl_run(monkeypatch, capsys, *TINY, *args)
    m = _metrics(out)
    assert code == 3 and m["status"] == "diverged" and "Traceback" not in err, err
    assert len(m["accuracy_matrix"]) == m["tasks_done"] < 3
