"""A run or sweep folder from elsewhere (shared, copied, downloaded) and sweep overrides are untrusted
input (issue 20, sections 1 and 3): reading them never evaluates anything (no OmegaConf resolver, no
pickle code), printing them never interprets rich markup, and no override value becomes a line of a
Slurm script."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from cl_runner import slurm
from cl_runner.report import summary as sweep

REPO = Path(__file__).resolve().parents[1]
CL_RUN = [sys.executable, "-c", "from cl_runner.app import cli; cli()"]
MARKUP = "[/red] [bold]x[/bold] ${oc.env:HOME}"
SECRET = "s3cr3t-value-of-the-reader"

# ----------------------------------------------------------------------------- Slurm scripts
HOSTILE = [
    "method=ewc",
    "+note='a\ntouch /tmp/pwned_by_a_job_name'",  # a quoted override value may hold a newline
    "+x='$(id) `id` ;id | id > f & \"q\" \\\\ \r\x0b\x00 é'",
    "lambda=1",
]
SAFE = re.compile(r"[A-Za-z0-9._:=,+@-]+")


def _shell_lines(script: str) -> list[str]:
    """The lines of an sbatch script that the shell runs (not comments, not blank)."""
    return [ln for ln in script.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_job_names_keep_a_safe_character_set_and_length():
    for overrides in ([*HOSTILE], [f"+k{i}='{chr(i)}'" for i in range(1, 128)], ["seed='" + "\n" * 500 + "'"]):
        name = slurm.job_name(overrides)
        assert SAFE.fullmatch(name) and len(name) <= 80, repr(name)
    name = slurm.job_name(HOSTILE)
    assert name.startswith("cl-run:ewc:note=_a_touch__tmp_pwned_by_a_job_name_,x=") and name.endswith("...")
    assert slurm.job_name(["method=ewc", "lambda=100", "seed=1"]) == "cl-run:ewc:lambda=100,seed=1"  # as before
    assert slurm.safe_name("my run\n#2") == "my_run__2" and slurm.safe_name("") == "cl-run"
    assert len(slurm.safe_name("a" * 1000)) == 80


def test_no_override_becomes_a_line_of_the_sbatch_script(tmp_path):
    """submitit's own script builder, fed the array's name as the launcher computes it: the shell
    lines are exactly those of a harmless name (no override value escapes its ``#SBATCH`` line)."""
    pytest.importorskip("submitit")
    from submitit.slurm.slurm import _make_sbatch_string

    def script(name: str) -> str:
        return _make_sbatch_string(
            command="python -u -m submitit.core._submit /x", folder=tmp_path / "%j", job_name=name, map_count=2
        )

    hostile = script(slurm.job_name(HOSTILE))
    assert _shell_lines(hostile) == _shell_lines(script("cl-run:ewc:lambda=1"))
    assert "touch" not in "\n".join(_shell_lines(hostile))


def test_strings_that_reach_an_sbatch_line_refuse_control_characters(tmp_path):
    """Every other string of ours that becomes an ``#SBATCH`` line (the launcher's settings, its
    submitit folder from hydra.sweep.dir, additional_parameters' keys and values) is refused with one
    line naming the key when it holds a line break or another control character; setup/teardown
    lines are shell lines by design (the user's own) and are not checked."""
    ok = {
        "partition": "gpu",
        "comment": "a comment, with spaces",
        "setup": ["export A=1\nexport B=2"],
        "submitit_folder": str(tmp_path / ".submitit" / "%j"),
        "additional_parameters": {"mail-type": "END"},
        "timeout_min": 60,
        "name": "cl-run",
    }
    assert slurm.script_problem(ok) is None
    cases = {
        "partition": ("partition", "gpu\nrm -rf ~"),
        "qos": ("qos", "a\rb"),
        "submitit_folder": ("submitit_folder", "/tmp/a\ntouch x/%j"),
        "additional_parameters.mail-user": ("additional_parameters", {"mail-user": "me\n id"}),
        "additional_parameters": ("additional_parameters", {"x\nid": "1"}),
        "srun_args[1]": ("srun_args", ["-v", "a\x00b"]),
    }
    for key, (param, value) in cases.items():
        line = slurm.script_problem({**ok, param: value})
        assert line is not None and line.startswith(f"hydra.launcher.{key} must not hold"), (key, line)
        assert "\n" not in line and "\r" not in line and "\x00" not in line, line


def test_checkpoint_rows_never_run_the_pickles_code(tmp_path):
    """A job folder's checkpoint.pt is loaded with weights_only=True: a pickle that calls a function
    is refused (no rows) instead of running it."""
    torch = pytest.importorskip("torch")
    marker = tmp_path / "payload_ran"
    torch.save({"trainer": _Payload(str(marker))}, tmp_path / "checkpoint.pt")
    assert slurm.finished_tasks(tmp_path) is None and not marker.exists()
    cfg = OmegaConf.create({"method": {"name": "ewc", "lambda": 1.0}, "seed": 0})
    result = slurm.record_outcome(tmp_path, cfg, "failed", "killed")
    assert not marker.exists() and result["status"] == "failed" and not result["accuracy_matrix"]  # no rows


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# ----------------------------------------------------------------------------- saved configs
@pytest.fixture
def spy():
    """A resolver that records every call: reading a folder must never call one."""
    calls = []
    OmegaConf.register_new_resolver("spy", lambda *a: calls.append(a) or "SPIED", replace=True)
    yield calls
    OmegaConf.clear_resolver("spy")


def _job(root: Path, name: str, overrides, config=None, metrics=None) -> Path:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if config is not None:
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def _hostile_sweep(root: Path) -> Path:
    env = "${oc.env:CL_SECRET}"
    config = {
        "seed": env,
        "scenario": "${spy:scenario}",
        "lambda": "${method.lambda}",  # a reference to another key of the same file: followed
        "method": {"name": "ewc", "lambda": 100, "path": env, "alpha": "${spy:opt}", "me": "${lambda}"},
        "benchmark": {"name": "a_" + env},
        "model": {"name": "${oc.decode:'[1, 2]'}"},
        "optimizer": "${oc.create:{name: adam}}",
        "data_dir": env,
    }
    _job(root, "0_seed=0", ["method=ewc", "seed=${spy:o}", f"lambda={env}"], config)
    multirun = {
        "hydra": {
            "overrides": {"task": ["method=ewc", "seed=0,1", f"lambda={env}"]},
            "sweeper": {"params": {"benchmark.pad": "${spy:params}"}},
            "job": {"config": {"override_dirname": {"exclude_keys": "${spy:exclude}"}}},
        }
    }
    (root / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    return root


def test_saved_configs_are_read_without_evaluating_anything(tmp_path, spy, monkeypatch):
    """.hydra/config.yaml, .hydra/overrides.yaml and multirun.yaml of a folder from elsewhere: no
    resolver runs (``${oc.env:…}`` would put the reader's environment into summary.csv), values
    holding ``${…}`` stay literal text; a plain reference to another key of the file is followed."""
    from cl_runner.identity import read_saved, sweep_jobs
    from cl_runner.schema import identity

    monkeypatch.setenv("CL_SECRET", SECRET)
    env = "${oc.env:CL_SECRET}"
    root = _hostile_sweep(tmp_path / "sweep")
    saved = read_saved(root / "0_seed=0" / ".hydra" / "config.yaml")
    assert saved["seed"] == env and saved["lambda"] == 100 and saved["method"]["me"] == 100
    ident = identity(saved)
    assert (ident["seed"], ident["scenario"], ident["lambda"], ident["benchmark"]) == (
        env,
        "${spy:scenario}",
        100,
        "a_" + env,
    )
    assert ident["method_options"] == {"path": env, "alpha": "${spy:opt}", "me": 100}
    assert (ident["model"], ident["optimizer"]) == ("${oc.decode:'[1, 2]'}", None)
    jobs = sweep_jobs(root / "multirun.yaml")
    assert [len(j) for j in jobs] == [4, 4] and [j[2] for j in jobs] == ["seed=0", "seed=1"]
    # as Hydra's sweeper writes them (it escapes the interpolation's characters), never resolved
    assert "spy" in jobs[0][0] and "CL_SECRET" in jobs[0][3] and SECRET not in str(jobs) and "SPIED" not in str(jobs)
    assert spy == []


def test_cl_run_summary_never_resolves_a_folders_interpolations(tmp_path, spy, monkeypatch):
    """The issue's case: ``cl-run-summary`` on a folder from elsewhere put ``${oc.env:…}``'s value
    (the reader's environment) in summary.csv; any registered resolver could run."""
    monkeypatch.setenv("CL_SECRET", SECRET)
    env = "${oc.env:CL_SECRET}"
    root = _hostile_sweep(tmp_path / "sweep")
    rows = sweep.collect(root)
    assert [(r["status"], r["seed"], r["lambda"]) for r in rows] == [
        ("missing", env, 100),
        ("missing", 0, env),
        ("missing", 1, env),
    ]
    assert rows[0]["method_options"] == {"path": env, "alpha": "${spy:opt}", "me": 100}
    assert sweep.main([str(root), "--quiet"]) == 1
    text = (root / "summary.csv").read_text() + (root / "summary.md").read_text()
    assert env in text and "${spy:scenario}" in text
    assert SECRET not in text and "SPIED" not in text and spy == []


def test_a_sweep_too_large_to_expand_is_not_expanded(tmp_path):
    from cl_runner.identity import sweep_jobs

    for task, jobs in ((["seed=range(0,1000000000)", "lambda=1,2"], None), (["seed=range(0,10,3)", "lambda=1,2"], 8)):
        (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))
        found = sweep_jobs(tmp_path / "multirun.yaml")
        assert (found if found is None else len(found)) == jobs


def test_saved_config_references_are_followed_but_bounded(tmp_path, spy):
    from cl_runner.identity import read_saved

    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump({"a": "${b}", "b": "${c.d}", "c": {"d": 7, "loop": "${c.loop}"}, "e": "x${b}", "f": "${.a}"})
    )
    data = read_saved(path)
    assert (data["a"], data["b"], data["c"]["loop"], data["e"], data["f"]) == (7, 7, "${c.loop}", "x${b}", "${.a}")
    aliases = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"  # ten levels of ten aliases: 10^10 values
    aliases += "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(9))
    path.write_text(aliases)
    with pytest.raises(ValueError, match="more than"):
        read_saved(path)
    path.write_text("!!python/object/apply:os.system ['touch pwned']\n")  # YAML tags: a safe loader
    with pytest.raises(Exception):  # noqa: B017, PT011 - whichever error, no code runs
        read_saved(path)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


# ----------------------------------------------------------------------------- printing
def _markup_sweep(root: Path) -> Path:
    metrics = {"status": "failed", "error": MARKUP, "method": "[bold]m[/]", "seed": 0, "lambda": None}
    _job(root, "0_[bold]", ["method=ewc", "+tag='[/red]'", "seed=0"], metrics=metrics)
    _job(root, "1_seed=1", ["method=ewc", "+tag=[b]", "seed=1"], metrics={**metrics, "seed": 1})
    return root


def test_untrusted_text_is_printed_literally(tmp_path, spy):
    from rich.console import Console

    rows = sweep.collect(_markup_sweep(tmp_path / "sweep"))
    console = Console(record=True, width=250)
    sweep.print_summary(rows, console)
    text = console.export_text()
    assert f"0_[bold]: {MARKUP}" in text and "[bold]m[/]" in text and "'[/red]'" in text and "[b]" in text
    assert spy == []


def test_cl_run_summary_prints_markup_literally_and_exits_1(tmp_path, spy, capsys):
    """The case of the issue: every job failed, an error text holds rich markup and an
    interpolation: the summary is written, the text printed as it is, exit status 1."""
    root = _markup_sweep(tmp_path / "sweep")
    assert sweep.main([str(root)]) == 1
    out = capsys.readouterr().out
    assert f"0_[bold]: {MARKUP}" in out
    assert MARKUP in (root / "summary.csv").read_text() and spy == []


def test_the_sweeps_exit_status_never_depends_on_printing(tmp_path, monkeypatch, capsys):
    """The callback keeps the rows for cl-run's exit status before it writes or prints anything."""
    root = _markup_sweep(tmp_path / "sweep")

    def broken(*a, **k):
        raise RuntimeError("terminal gone")

    monkeypatch.setattr(sweep, "print_summary", broken)
    cb = sweep.SummaryCallback()
    cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}}}))
    assert cb.rows is not None and sweep.sweep_status(cb.rows) == 1
    assert "summary: could not summarize the sweep: RuntimeError: terminal gone" in capsys.readouterr().err
    assert (root / "summary.csv").is_file()


def test_run_console_prints_names_and_paths_literally(tmp_path):
    from rich.console import Console

    from cl_runner.report.terminal import ConsoleLogger

    console = Console(record=True, width=250, force_terminal=True, file=io.StringIO())
    run_dir = tmp_path / "[/red]{x}"
    log = ConsoleLogger(console, run_dir=run_dir)
    log.task_start(0, "[/red] {task.id} [bold]", 2)
    log.progress(0, 1, 0.5)
    log.task_end(0, 0, [0.5, 0.4], [0.0, 0.0])
    result = {
        "task_names": ["[/red]", "[bold]b"],
        "initial_accuracy": [0.1, 0.1],
        "accuracy_matrix": [[0.9, 0.1], [0.8, 0.9]],
        "lambda": None,
        "benchmark": "[/b]",
        "scenario": "[i]",
        "seed": "[/]",
        "method": "[/red]m",
        **dict.fromkeys(("acc", "bwt", "fwt", "forgetting", "learning_accuracy"), 0.5),
        "wall_time_s": 1.0,
        "status": "[/x]",
    }
    log.final(result)
    text = console.export_text()
    for literal in (
        "task 1 [/red] {task.id} [bold]",
        "T1 [/red]",
        "T2 [bold]b",
        "[/red]m on [/b], [i]-IL, seed [/]",
        f"results ([/x]): {run_dir}",
    ):
        assert literal in text, literal


@pytest.mark.slow
def test_a_sweep_whose_jobs_all_failed_with_markup_exits_1(tmp_path):
    """End to end (issue 20): every job fails with an error naming a data_dir that holds rich
    markup; the sweep's summary prints it and cl-run exits 1 (it exited 0: the printing raised)."""
    out = tmp_path / "sweep"
    args = ["-m", "benchmark=split_mnist", "data_dir='/nonexistent/[/red]'", "download=false", "seed=0,1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    res = subprocess.run(
        [*CL_RUN, *args, "threads=1", "device=cpu", f"hydra.sweep.dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "could not summarize" not in res.stderr and "/nonexistent/[/red]/MNIST" in res.stdout
    assert "2 jobs: 0 ok, 2 failed" in res.stdout and (out / "summary.csv").is_file()


_FAKE_SLURM = {  # just enough of Slurm for the launcher: sbatch keeps the script, every job ends cancelled
    "sbatch": 'cp "$1" "$FAKE_SLURM_DIR/script.sh"\necho "Submitted batch job 4242"',
    "squeue": 'echo "slurm_load_jobs error: Invalid job id specified" >&2\nexit 1',
    "sacct": "printf '4242_0|CANCELLED by 0\\n4242_1|CANCELLED by 0\\n'",
    "scancel": "exit 0",
    "sinfo": "echo debug",
    "srun": "exit 0",
}


@pytest.mark.slow
def test_the_slurm_launcher_writes_a_safe_script_or_refuses(tmp_path):
    """The launcher end to end against stand-ins for sbatch/squeue/sacct: a name holding a line
    break and shell syntax reaches the script as one safe ``#SBATCH`` line; a line break in a launcher
    setting is one ``error:`` line naming it, exit 2, nothing submitted."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in _FAKE_SLURM.items():
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_DIR=str(tmp_path), COLUMNS="200")
    common = ["-m", "hydra/launcher=slurm", "hydra.launcher.poll_s=0.05", "seed=0,1"]

    def cl_run(*args: str) -> subprocess.CompletedProcess:
        cmd = [*CL_RUN, *common, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)

    res = cl_run("hydra.launcher.name='x\ntouch pwned; $(id)'", f"hydra.sweep.dir={tmp_path / 's1'}")
    assert res.returncode == 1, res.stderr[-2000:]  # every job "cancelled"
    script = (tmp_path / "script.sh").read_text()
    assert "#SBATCH --job-name=x_touch_pwned____id_\n" in script
    assert [ln for ln in _shell_lines(script) if "touch" in ln or "id" in ln.split()] == []
    (tmp_path / "script.sh").unlink()
    res = cl_run("hydra.launcher.partition='gpu\ntouch pwned'", f"hydra.sweep.dir={tmp_path / 's2'}")
    assert res.returncode == 2 and not (tmp_path / "script.sh").exists()
    error = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(error) == 1 and error[0].startswith("error: hydra.launcher.partition must not hold a line break")
    assert "Traceback" not in res.stderr
