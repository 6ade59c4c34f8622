"""Sweeps on Slurm (``hydra/launcher=slurm``): the launcher's decisions as functions (always run), and
sweeps through a real Slurm cluster (marked ``slurm``; skipped when no cluster answers —
``scripts/slurm_cluster.sh up`` brings a one-node cluster up on a Debian machine where you are root).

The cluster tests use the offline digits benchmarks with ``threads=1`` and the cluster's one CPU per
job; a slow job is made with ``iterations`` (optimizer steps per task).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CL_RUN, ROOT, compose_config

from cl_runner import slurm

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")


# ----------------------------------------------------------------------------- decisions (no cluster)
PARAMS = {
    "partition": "nope",
    "gpus_per_node": 1,
    "cpus_per_task": 4,
    "mem_gb": 100,
    "timeout_min": 1,
    "max_num_timeout": 3,
    "account": "x",
}


@pytest.mark.parametrize(
    "stderr, starts, contains",
    [  # sbatch's own words, as Slurm 22.05 printed them on the test cluster
        (
            "sbatch: error: invalid partition specified: nope\n"
            "sbatch: error: Batch job submission failed: Invalid partition name specified",
            "hydra.launcher.partition=nope: ",
            "invalid partition specified: nope",
        ),
        (
            "sbatch: error: Batch job submission failed: Invalid generic resource (gres) specification",
            "hydra.launcher.gpus_per_node=1: ",
            "Invalid generic resource (gres) specification",
        ),
        (
            "sbatch: error: Memory specification can not be satisfied\nsbatch: error: Batch job submission failed: "
            "Requested node configuration is not available",
            "hydra.launcher.mem_gb=100: ",
            "Memory specification",
        ),
        (
            "sbatch: error: Batch job submission failed: Requested node configuration is not available",
            "hydra.launcher.cpus_per_task=4 / mem_gb=100 / gpus_per_node=1: ",
            "node configuration",
        ),
        (
            "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
            "hydra.launcher.account=x: ",
            "Invalid account",
        ),
        ("sbatch: error: something new", "the hydra.launcher.* settings: ", "something new"),
    ],
)
def test_sbatch_rejection_names_the_key(stderr, starts, contains):
    line = slurm.sbatch_error(stderr, PARAMS, ["debug", "gpu"] if "partition" in starts else [])
    assert line.startswith(starts) and contains in line and "\n" not in line
    assert ("choose one of: debug, gpu" in line) == ("partition" in starts)


def test_stuck_pending_reasons():
    assert slurm.stuck_reason("PartitionConfig") == ("partition", "cpus_per_task", "mem_gb", "gpus_per_node")
    assert slurm.stuck_reason("PartitionTimeLimit") == ("partition", "timeout_min")
    assert slurm.stuck_reason("QOSMaxWallDurationPerJobLimit") is not None
    for waits in (
        "Resources",
        "Priority",
        "JobArrayTaskLimit",
        "ReqNodeNotAvail, UnavailableNodes:n1",
        "BeginTime",
        "None",
    ):
        assert slurm.stuck_reason(waits) is None, waits
    assert (
        slurm.launcher_keys(("cpus_per_task", "mem_gb"), {"cpus_per_task": 4})
        == "hydra.launcher.cpus_per_task=4 / mem_gb=null"
    )


@pytest.mark.parametrize(
    "state, recorded, expected",
    [
        ("CANCELLED by 0", None, "cancelled"),  # cancelled before the run wrote anything
        ("CANCELLED by 0", "interrupted", "cancelled"),  # the run saved its finished tasks first
        ("CANCELLED (while pending)", None, "cancelled"),
        ("TIMEOUT", None, "timeout"),
        ("TIMEOUT", "interrupted", "timeout"),
        ("COMPLETED", "ok", None),
        ("CANCELLED by 0", "ok", None),  # finished just before scancel: ok stays
        ("FAILED", "failed", None),
        ("COMPLETED", "diverged", None),
        ("FAILED", "timeout", None),  # the job recorded its own timeout (out of requeues)
        ("PREEMPTED", "interrupted", None),  # resumable as it is
        ("OUT_OF_MEMORY", None, "failed"),
        ("COMPLETED", None, "failed"),
        (None, None, "failed"),
    ],
)
def test_outcome(state, recorded, expected):
    assert slurm.outcome(state, recorded) == expected


def test_outcome_messages_name_the_keys():
    p = {"timeout_min": 1, "max_num_timeout": 3, "mem_gb": 2}
    assert "while pending" in slurm.outcome_message("cancelled", "7_2", "CANCELLED", p, None, started=False)
    msg = slurm.outcome_message("cancelled", "7_0", "CANCELLED by 0", p, 2)
    assert "while running" in msg and "2 finished task(s) kept" in msg
    msg = slurm.outcome_message("timeout", "7_1", "TIMEOUT", p, 3)
    assert "hydra.launcher.timeout_min=1" in msg and "max_num_timeout" in msg and "3 finished task(s)" in msg
    assert "hydra.launcher.mem_gb=2" in slurm.outcome_message("failed", "7_1", "OUT_OF_MEMORY", p, None)


def test_record_outcome_keeps_the_runs_rows_and_creates_a_missing_folder(tmp_path):
    cfg = compose_config("method=ewc", "lambda=100", "seed=3", "benchmark=split_digits")
    # an interrupted run (as cl_runner.app writes it) relabelled cancelled: its rows stay
    run = tmp_path / "0_run"
    run.mkdir()
    interrupted = {
        "status": "interrupted",
        "error": "interrupted during task 3",
        "method": "ewc",
        "lambda": 100.0,
        "seed": 3,
        "accuracy_matrix": [[0.9, 0.1], [0.8, 0.95]],
        "initial_accuracy": [0.5, 0.5],
        "task_names": ["a", "b"],
        "tasks_done": 2,
        "acc": None,
    }
    (run / "metrics.json").write_text(json.dumps(interrupted))
    slurm.record_outcome(run, cfg, "cancelled", "cancelled while running")
    data = json.loads((run / "metrics.json").read_text())
    assert data["status"] == "cancelled" and data["error"] == "cancelled while running"
    assert data["accuracy_matrix"] == interrupted["accuracy_matrix"] and data["tasks_done"] == 2
    assert (run / "accuracy_matrix.csv").read_text().splitlines()[2].startswith("task_1,0.9,")
    # a final result is never replaced
    (run / "metrics.json").write_text(json.dumps({**interrupted, "status": "ok"}))
    slurm.record_outcome(run, cfg, "cancelled", "late")
    assert json.loads((run / "metrics.json").read_text())["status"] == "ok"
    # a job cancelled while pending has no folder: it is created, with the identity fields
    never = tmp_path / "2_never"
    slurm.record_outcome(never, cfg, "cancelled", "cancelled while pending")
    data = json.loads((never / "metrics.json").read_text())
    assert (data["status"], data["method"], data["lambda"], data["seed"], data["benchmark"]) == (
        "cancelled",
        "ewc",
        100,
        3,
        "split_digits",
    )
    assert data["acc"] is None and not (never / "accuracy_matrix.csv").exists()


def test_record_outcome_reads_rows_from_a_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    cfg = compose_config()
    torch.save(
        {"trainer": {"tasks_done": 1, "matrix": [[0.75, 0.25]], "initial": [0.5, 0.5]}, "wall_time_s": 3.0},
        tmp_path / "checkpoint.pt",
    )
    slurm.record_outcome(tmp_path, cfg, "timeout", "killed")
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert (data["status"], data["accuracy_matrix"], data["tasks_done"]) == ("timeout", [[0.75, 0.25]], 1)
    assert slurm.finished_tasks(tmp_path) == 1


def test_job_names_and_memory():
    assert slurm.job_name(["method=ewc", "lambda=100", "seed=1", "hydra.launcher.partition=x", "data_dir=/d"]) == (
        "cl-run:ewc:lambda=100,seed=1"
    )
    assert slurm.job_name(["seed=0,1,2"], default_method="finetune") == "cl-run:finetune:seed=0,1,2"
    long = slurm.job_name([f"method.option_{i}=value" for i in range(20)], "si")
    assert len(long) == 80 and long.endswith("...")
    assert slurm.default_mem_gb(["split_digits"]) == 2
    assert slurm.default_mem_gb(["split_digits", "split_mnist"]) == 4
    assert slurm.default_mem_gb(["split_cifar100"]) == 8 and slurm.default_mem_gb(["new_benchmark"]) == 8


def test_presets_ask_for_what_a_job_needs():
    import hydra

    with hydra.initialize_config_module("cl_runner.configs", version_base="1.3"):
        cfg = hydra.compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        gpu = hydra.compose(
            "config", overrides=["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.cl_runner_launcher.slurm_launcher.ClRunnerSlurmLauncher"
    assert (launcher.cpus_per_task, launcher.gpus_per_node, launcher.mem_gb, launcher.tasks_per_node) == (
        1,
        None,
        None,
        1,
    )
    assert launcher.max_num_timeout >= 1 and launcher.name == "cl-run"
    assert (gpu.hydra.launcher.gpus_per_node, gpu.hydra.launcher.partition, gpu.hydra.launcher.cpus_per_task) == (
        1,
        "gpu",
        4,
    )


def test_job_signals(monkeypatch):
    """In a job: USR2 goes to submitit's handler; when submitit refuses to requeue, the run is
    interrupted (KeyboardInterrupt) and the job knows it timed out; SIGTERM interrupts the run unless
    a requeue is under way."""
    pytest.importorskip("submitit")
    from submitit.core.utils import UncompletedJobError

    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    calls = []

    def requeue(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)  # what submitit does after `scontrol requeue`

    def refuse(signum, frame):
        raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    try:
        for handler, outcome in ((requeue, SystemExit), (refuse, slurm.TimeLimitReached)):
            monkeypatch.setitem(slurm.STOP, "why", None)
            signal.signal(signal.SIGUSR2, handler)
            slurm.job_signals()
            with pytest.raises(outcome):
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(5)
            os.kill(os.getpid(), signal.SIGTERM)  # during / after the requeue or timeout: ignored
            time.sleep(0.1)
        assert calls == [signal.SIGUSR2] and slurm.STOP["why"] == "timeout"
        assert issubclass(slurm.TimeLimitReached, KeyboardInterrupt)
        monkeypatch.setitem(slurm.STOP, "why", None)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert slurm.STOP["why"] == "signal"
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


@pytest.mark.slow
def test_installed_wheel_finds_the_launcher(tmp_path, installed_site):
    """Hydra finds launchers by scanning the hydra_plugins namespace: the wheel must ship the plugin."""
    site = installed_site
    assert (site / "hydra_plugins" / "cl_runner_launcher" / "slurm_launcher.py").is_file()
    assert not (site / "hydra_plugins" / "__init__.py").exists()  # a namespace shared with other plugins
    probe = (
        "import cl_runner, hydra_plugins.cl_runner_launcher as p; print(cl_runner.__file__, p.__file__);"
        "from hydra.core.plugins import Plugins; from hydra.plugins.launcher import Launcher;"
        "print([c.__name__ for c in Plugins.instance().discover(Launcher)])"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    files, launchers = out.stdout.splitlines()
    assert all(f.startswith(str(site)) for f in files.split())
    assert "ClRunnerSlurmLauncher" in launchers
    res = subprocess.run(
        [
            sys.executable,
            str(site / "bin" / "cl-run"),
            "hydra/launcher=slurm",
            "--cfg",
            "hydra",
            "-p",
            "hydra.launcher._target_",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "ClRunnerSlurmLauncher" in res.stdout, res.stderr


# ----------------------------------------------------------------------------- a real cluster
def _cluster() -> str | None:
    """None when a Slurm cluster with accounting answers, else why not."""
    if not shutil.which("sbatch"):
        return "no sbatch on PATH"
    try:
        up = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=10)
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo/sacct failed: {e}"
    if up.returncode or "up" not in up.stdout.split():
        return f"sinfo finds no partition up ({(up.stderr or up.stdout).strip()[:200]})"
    if acct.returncode:
        return f"sacct fails, no job accounting ({acct.stderr.strip()[:200]})"
    return None


_WHY_NOT = _cluster()
cluster = pytest.mark.skipif(
    _WHY_NOT is not None,
    reason=f"no Slurm cluster: {_WHY_NOT}; `sudo scripts/slurm_cluster.sh up` brings up a one-node cluster on Debian",
)
SLURM = ["hydra/launcher=slurm", "hydra.launcher.poll_s=1", "threads=1", "device=cpu", "method=finetune"]
DIGITS = "benchmark=split_digits"


def _sweep(*args: str, timeout: int = 420, wait: bool = True):
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    cmd = [*CL_RUN, "-m", *SLURM, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _job_folder(sweep_dir: Path, num: int) -> Path:
    """Job ``num``'s folder (``<num>`` or ``<num>_<what varies>``); a path that does not exist yet if none."""
    found = [p for p in sweep_dir.glob(f"{num}*") if p.name == str(num) or p.name.startswith(f"{num}_")]
    return found[0] if found else sweep_dir / f"{num}.missing"


def _folders(sweep_dir: Path) -> list[Path]:
    return sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit()), key=lambda p: int(p.name.split("_")[0])
    )


def _array_id(stdout: str) -> str:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("Slurm job array "))
    return line.split()[3].rstrip(":")


def _sacct(job: str, fields: str = "JobID,JobName%80,State") -> list[list[str]]:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-D", "-j", job, "-o", fields], capture_output=True, text=True, timeout=30
    )
    return [ln.split("|") for ln in out.stdout.splitlines()]


def _check_summary(sweep_dir: Path, n: int) -> list[dict]:
    rows, folders = _rows(sweep_dir), _folders(sweep_dir)
    assert [r["num"] for r in rows] == [str(i) for i in range(n)] and len(folders) == n
    found = []
    for row, folder in zip(rows, folders, strict=True):
        m = _metrics(folder)
        assert row["status"] == m["status"], (row, m["status"])
        if m["status"] == "ok":
            assert float(row["acc_pct"]) == pytest.approx(100 * m["acc"])  # the summary is in percent
        found.append(m)
    return found


@pytest.mark.slurm
@cluster
def test_sweep_of_three_jobs_all_ok(tmp_path):
    out = tmp_path / "sweep"
    res = _sweep(DIGITS, "seed=0,1,2", "epochs=1", f"hydra.sweep.dir={out}", timeout=180)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    array = _array_id(res.stdout)
    assert f"Slurm job array {array}: 3 jobs ({array}_0 … {array}_2)" in res.stdout
    found = _check_summary(out, 3)
    assert [m["status"] for m in found] == ["ok"] * 3 and [m["seed"] for m in found] == [0, 1, 2]
    assert "3 jobs: 3 ok" in res.stdout
    # each job renamed itself after its overrides; sacct says they completed
    names = {jid: (name, state) for jid, name, state in _sacct(array)}
    for i in range(3):
        name, state = names[f"{array}_{i}"]
        assert (
            state == "COMPLETED"
            and name.startswith("cl-run:finetune:")
            and f"seed={i}" in name.split(":")[2].split(",")
        )
    assert len(list((out / ".submitit").glob("*/*_log.out"))) == 3


@pytest.mark.slurm
@cluster
def test_cancel_one_running_and_one_pending_job(tmp_path):
    """array_parallelism=1: job 0 (slow) runs while 1 and 2 wait. Once job 0 saved a finished task,
    scancel job 2 (pending) and job 0 (running); job 1 then runs and ends ok. The sweep is still
    summarized: 0 cancelled with its finished tasks, 1 ok, 2 cancelled (a folder made for it)."""
    out = tmp_path / "sweep"
    proc = _sweep(
        DIGITS, "iterations=4000,40,40", "hydra.launcher.array_parallelism=1", f"hydra.sweep.dir={out}", wait=False
    )
    try:
        end = time.monotonic() + 420  # the whole test, bounded (CI; 2 cores shared with the other xdist worker)
        while not (_job_folder(out, 0) / "checkpoint.pt").is_file():
            assert proc.poll() is None and time.monotonic() < end - 120, "job 0 saved no finished task in time"
            time.sleep(0.5)
        array = _submitted(out).split("_")[0]
        states = {jid: state for jid, state in _squeue(array)}
        assert states[f"{array}_0"] == "RUNNING" and states[f"{array}_2"] == "PENDING", states
        subprocess.run(["scancel", f"{array}_2"], check=True, timeout=30)
        subprocess.run(["scancel", f"{array}_0"], check=True, timeout=30)
        stdout, stderr = proc.communicate(timeout=max(10, end - time.monotonic()))
    finally:
        _stop(proc, out)
    assert proc.returncode == 1, stdout[-2000:] + stderr[-3000:]  # not every job ended ok
    assert "Traceback" not in stderr
    m0, m1, m2 = _check_summary(out, 3)
    assert m0["status"] == "cancelled" and "while running" in m0["error"]
    assert m0["tasks_done"] >= 1 and len(m0["accuracy_matrix"]) == m0["tasks_done"]  # the finished rows are kept
    assert m1["status"] == "ok" and len(m1["accuracy_matrix"]) == 5
    assert m2["status"] == "cancelled" and "while pending" in m2["error"] and not m2.get("accuracy_matrix")
    assert (m2["method"], m2["benchmark"], m2["seed"]) == ("finetune", "split_digits", 0)
    assert f"job {array}_2: cancelled" in stderr and f"job {array}_0: cancelled" in stderr
    assert not _squeue(array)


def _submitted(sweep_dir: Path) -> str:
    """The Slurm id of the sweep's first job (``<array>_0``, or ``<job>`` for a one-job sweep), from
    submitit's folders."""
    return sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir() and p.name[0].isdigit())[0]


def _stop(proc: subprocess.Popen, sweep_dir: Path) -> None:
    """A test that fails midway leaves neither cl-run nor its jobs behind."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        if (sweep_dir / ".submitit").is_dir():
            subprocess.run(["scancel", _submitted(sweep_dir).split("_")[0]], check=False, timeout=30)


def _squeue(array: str) -> list[list[str]]:
    out = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%i|%T"], capture_output=True, text=True, timeout=30)
    return [ln.split("|") for ln in out.stdout.splitlines()]


LIMIT = ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=5"]
# requeued job: 5 short tasks (a few seconds each)
SHORT = [DIGITS, "iterations=1000"]
# timeout job: 300 tasks of 200 steps, more than a 1-minute attempt can train on any machine, each task
# short enough that the attempt finishes some on a slow one (30 tasks of 2000 steps finished none in CI,
# its node's 2 cores shared with the requeued job and the other xdist worker)
LONG_TASKS = 300
LONG = ["benchmark=permuted_digits", f"benchmark.n_tasks={LONG_TASKS}", "iterations=200"]


@pytest.mark.slurm
@cluster
def test_time_limit_requeue_resumes_and_out_of_requeues_is_timeout(tmp_path):
    """Two 1-minute-limited sweeps side by side.

    Requeue: once the job has saved a finished task, it gets the pre-timeout signal (SIGUSR2, what
    Slurm sends ``signal_delay_s`` before the limit: the moment Slurm picks varies by up to 30 s, so
    the test sends it itself, like submitit's own test helper). It checkpoints, is requeued, resumes
    from its last finished task and ends ok with the very matrix of an uninterrupted run.
    Timeout: no requeue allowed and more work than a minute: Slurm's own pre-timeout signal ends it as
    a ``timeout`` row with the tasks it finished."""
    requeue, timeout, reference = tmp_path / "requeue", tmp_path / "timeout", tmp_path / "reference"
    p_timeout = _sweep(
        "seed=0", *LONG, *LIMIT, "hydra.launcher.max_num_timeout=0", f"hydra.sweep.dir={timeout}", wait=False
    )
    p_requeue = _sweep(
        "seed=0", *SHORT, *LIMIT, "hydra.launcher.max_num_timeout=10", f"hydra.sweep.dir={requeue}", wait=False
    )
    try:
        end = time.monotonic() + 600  # the whole test, bounded (CI); 1-2 minutes on a free machine
        while not (_job_folder(requeue, 0) / "checkpoint.pt").is_file():
            assert p_requeue.poll() is None and time.monotonic() < end - 300, "the job saved no finished task in time"
            time.sleep(0.2)
        job = _submitted(requeue)
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
        # the same run without Slurm, for its matrix
        ref = subprocess.run(
            [*CL_RUN, "seed=0", "threads=1", "device=cpu", "method=finetune", *SHORT, f"hydra.run.dir={reference}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=max(10, end - time.monotonic()),
        )
        assert ref.returncode == 0, ref.stderr[-2000:]
        out_r, err_r = p_requeue.communicate(timeout=max(10, end - time.monotonic()))
        out_t, err_t = p_timeout.communicate(timeout=max(10, end - time.monotonic()))
    finally:
        _stop(p_requeue, requeue)
        _stop(p_timeout, timeout)

    assert p_requeue.returncode == 0, out_r[-2000:] + err_r[-3000:]
    (m,) = _check_summary(requeue, 1)
    assert m["status"] == "ok" and m["accuracy_matrix"] == _metrics(reference)["accuracy_matrix"]
    runs = _sacct(job, "JobID,State")
    assert runs[0][1] == "REQUEUED" and runs[-1][1] == "COMPLETED", runs
    log = next((requeue / ".submitit" / job).glob("*_log.out")).read_text()
    assert "Requeued job" in log and "resuming" in log and "tasks 1–" in log

    assert p_timeout.returncode == 1, out_t[-2000:] + err_t[-3000:]
    (t,) = _check_summary(timeout, 1)
    assert t["status"] == "timeout" and "hydra.launcher.timeout_min=1" in t["error"], t["error"]
    assert 1 <= t["tasks_done"] < LONG_TASKS and len(t["accuracy_matrix"]) == t["tasks_done"]
    assert [s for _, s in _sacct(_submitted(timeout), "JobID,State")] == ["FAILED"]  # ended by cl-run, not killed
    assert "Traceback" not in err_t and "Traceback" not in err_r


@pytest.mark.slurm
@cluster
@pytest.mark.parametrize(
    "override, key, slurm_says",
    [
        ("hydra.launcher.partition=nope", "hydra.launcher.partition=nope", "invalid partition specified"),
        ("hydra.launcher.gpus_per_node=1", "hydra.launcher.gpus_per_node=1", "Invalid generic resource (gres)"),
        (
            "hydra.launcher.cpus_per_task=4",
            "cpus_per_task=4",
            "PartitionConfig",
        ),  # 4 CPUs on a 2-CPU node: pends forever
    ],
)
def test_bad_request_is_one_error_line(tmp_path, override, key, slurm_says):
    out = tmp_path / "sweep"
    res = _sweep(DIGITS, "seed=0,1,2", "epochs=1", override, f"hydra.sweep.dir={out}", timeout=90)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and key in lines[0] and slurm_says in lines[0], lines[0]
    if "partition" in override:
        assert "choose one of: " in lines[0]
    assert not [p for p in out.iterdir() if p.is_dir() and p.name[0].isdigit()] if out.exists() else True
    mine = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, timeout=30).stdout
    assert "cl-run:finetune:seed=0,1,2" not in mine  # nothing left in the queue
