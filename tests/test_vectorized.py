"""The vectorized launcher (``hydra/launcher=vectorized``) and stacked training (cl_runner/stacked.py):
every job's outputs equal the basic launcher's, bitwise on the CPU (forward=loop), for every stackable
method, for λ and seed sweeps; a diverging member; methods that are not stackable run alone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import cl_run

# a shortened permuted-digits stream (the default benchmark): 3 tasks, 1 epoch, small subsets
SHORT = [
    "epochs=1",
    "threads=1",
    "device=cpu",
    "benchmark.n_tasks=3",
    "benchmark.max_train_per_task=120",
    "benchmark.max_test_per_task=60",
]
STACKABLE = ["finetune", "joint", "l2", "ewc", "online_ewc", "mas", "si"]
REGULARIZED = ["l2", "ewc", "online_ewc", "mas", "si"]


def _sweep(folder: Path, *args: str, vectorized: bool) -> str:
    launcher = ["hydra/launcher=vectorized"] if vectorized else []
    proc = cl_run("-m", *args, *launcher, f"hydra.sweep.dir={folder}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _jobs(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/metrics.json"))}


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _same_outputs(basic: Path, vec: Path, n_jobs: int) -> None:
    """Each job: the same folder name, metrics.json (but wall time), accuracy_matrix.csv, TensorBoard
    scalars (accuracies, loss and penalty per step) and the same summary.csv row."""
    a, b = _jobs(basic), _jobs(vec)
    assert len(a) == n_jobs and a.keys() == b.keys()
    for job in a:
        assert b[job]["status"] == "ok", b[job]["error"]
        for key in set(a[job]) - {"wall_time_s"}:
            assert a[job][key] == b[job][key], (job, key)
        assert (basic / job / "accuracy_matrix.csv").read_bytes() == (vec / job / "accuracy_matrix.csv").read_bytes()
        sa, sb = _scalars(basic / job), _scalars(vec / job)
        assert sa.keys() == sb.keys() and "train/loss" in sa and "acc/task_1" in sa
        for tag in sa:
            assert sa[tag] == sb[tag], (job, tag)

    def rows(folder):
        with open(folder / "summary.csv") as f:
            return [{k: v for k, v in r.items() if k not in ("wall_time_s", "time_s")} for r in csv.DictReader(f)]

    assert rows(basic) == rows(vec)


def _stacked_groups(log: str) -> int:
    """Groups the launcher formed: stacked (vmap) or one after another (loop, the CPU's auto)."""
    return log.count("train as one stacked group") + log.count("form one group")


def _sweeps_equal(tmp_path: Path, args: list[str], groups: int, n_jobs: int) -> None:
    """The same sweep with the basic and the vectorized launcher: ``groups`` groups, equal outputs."""
    _sweep(tmp_path / "basic", *args, vectorized=False)
    log = _sweep(tmp_path / "vec", *args, vectorized=True)
    assert _stacked_groups(log) == groups
    _same_outputs(tmp_path / "basic", tmp_path / "vec", n_jobs)


@pytest.mark.slow
def test_seed_sweep_every_method_bitwise(tmp_path):
    """Seeds 0 and 1 of every stackable method: each pair trains as one group (own init, own batch
    order, own permutations), and every output equals the basic launcher's."""
    args = [*SHORT, f"method={','.join(STACKABLE)}", "seed=0,1"]
    _sweeps_equal(tmp_path, args, groups=len(STACKABLE), n_jobs=2 * len(STACKABLE))


@pytest.mark.slow
def test_lambda_sweep_every_regularizer_bitwise(tmp_path):
    """λ sweeps of every regularized method (each its own importance and anchors per member)."""
    args = [*SHORT, f"method={','.join(REGULARIZED)}", "lambda=1,10000"]
    _sweeps_equal(tmp_path, args, groups=len(REGULARIZED), n_jobs=2 * len(REGULARIZED))


@pytest.mark.slow
def test_task_il_joint_and_method_options(tmp_path):
    """Task-IL (joint's per-sample heads), a method option and the learning rate as stacked keys."""
    args = [*SHORT, "scenario=task", "method=si", "method.xi=0.01,1", "optimizer.lr=1e-3,3e-4"]
    _sweeps_equal(tmp_path, args, groups=1, n_jobs=4)


@pytest.mark.slow
def test_diverging_member_is_marked_and_the_others_finish(tmp_path):
    """A learning rate that blows up one member: its row says diverged (as a separate run's would,
    at the same step); the other member's results equal its separate run's."""
    args = [*SHORT, "method=ewc", "lambda=100", "optimizer=sgd", "optimizer.lr=0.01,1e30"]
    basic = cl_run("-m", *args, f"hydra.sweep.dir={tmp_path / 'basic'}", timeout=600)
    vec = cl_run("-m", *args, "hydra/launcher=vectorized", f"hydra.sweep.dir={tmp_path / 'vec'}", timeout=600)
    assert basic.returncode == vec.returncode == 1  # a sweep with a diverged job
    assert _stacked_groups(vec.stdout + vec.stderr) == 1
    a, b = _jobs(tmp_path / "basic"), _jobs(tmp_path / "vec")
    statuses = {job: m["status"] for job, m in b.items()}
    assert sorted(statuses.values()) == ["diverged", "ok"]
    for job in a:
        assert a[job]["status"] == b[job]["status"]
        assert a[job]["error"] == b[job]["error"]  # the same task and step
        assert a[job]["accuracy_matrix"] == b[job]["accuracy_matrix"]
    with open(tmp_path / "vec" / "summary.csv") as f:
        assert sorted(r["status"] for r in csv.DictReader(f)) == ["diverged", "ok"]


def test_only_methods_that_declare_it_are_stackable(compose_cfg):
    """``stackable = True`` must be the class's own: a method added later (even a subclass of a
    stackable one) runs alone, with the reason in the log."""
    from cl_runner.methods.l2 import L2
    from cl_runner.stacked import stackable_method
    from hydra_plugins.cl_runner_launcher.vectorized_launcher import why_not_stacked

    class Later(L2):
        name = "later"

    assert stackable_method(L2) and not stackable_method(Later)
    cfg = compose_cfg("method=l2")
    cfg.method._target_ = f"{__name__}.Later"
    globals()["Later"] = Later
    assert why_not_stacked(cfg) == "method=l2 is not known to be stackable"


def test_max_members_and_bad_launcher_options(tmp_path):
    proc = cl_run(
        "-m",
        *SHORT,
        "benchmark.n_tasks=2",
        "method=l2",
        "lambda=1,2,3",
        "hydra/launcher=vectorized",
        "hydra.launcher.max_members=2",
        f"hydra.sweep.dir={tmp_path / 'a'}",
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert _stacked_groups(log) == 1 and "jobs #0, #1 form one group (forward=loop" in log
    assert "job #2 runs alone: no other job of the sweep differs from it only in stackable keys" in log
    assert len(_jobs(tmp_path / "a")) == 3
    for bad, says in (("max_members=0", "max_members must be a positive integer"), ("forward=fast", "choose one")):
        proc = cl_run(
            "-m",
            "method=l2",
            "lambda=1,2",
            "hydra/launcher=vectorized",
            f"hydra.launcher.{bad}",
            f"hydra.sweep.dir={tmp_path / bad.split('=')[0]}",
        )
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and says in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / bad.split("=")[0]).exists()


def test_group_key_ignores_only_stackable_keys(compose_cfg):
    from hydra_plugins.cl_runner_launcher.vectorized_launcher import group_key, why_not_stacked

    base = group_key(compose_cfg("method=ewc"))
    for same in ("lambda=1", "seed=4", "optimizer.lr=0.1", "method.fisher_labels=true", "method.half=false"):
        assert group_key(compose_cfg("method=ewc", same)) == base, same
    for other in ("epochs=3", "batch_size=8", "model=mlp_1000", "method=si", "scenario=class", "optimizer=sgd"):
        assert group_key(compose_cfg("method=ewc", other)) != base, other
    assert why_not_stacked(compose_cfg("method=ewc")) is None
    assert "dropout" in why_not_stacked(compose_cfg("method=ewc", "model.dropout=0.5"))


def test_vmap_forward_matches_separate_steps_to_rounding(one_thread):
    """forward=vmap: one batched forward over stacked parameters gives each member the gradient of
    its own loss (to float rounding: batched matmuls sum in another order), no coupling between
    members (a member's gradient does not change when another member's data changes)."""
    from torch.func import functional_call, stack_module_state, vmap

    from cl_runner.models.mlp import MLP
    from cl_runner.trainer import task_loss

    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(MLP((1, 8, 8), 10, [32, 32]))
    x, y = torch.randn(3, 16, 1, 8, 8), torch.randint(0, 10, (3, 16))

    def stacked_grads(x):
        params, _ = stack_module_state(models)
        out = vmap(lambda p, xb: functional_call(models[0], p, (xb,)))(params, x)
        sum(task_loss(out[k], y[k], (0, 10)) for k in range(3)).backward()
        return {n: p.grad for n, p in params.items()}

    g = stacked_grads(x)
    for k, m in enumerate(models):
        m.zero_grad()
        task_loss(m(x[k]), y[k], (0, 10)).backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(g[n][k], p.grad, rtol=1e-5, atol=1e-6)
    x2 = x.clone()
    x2[1] += 1.0  # member 1's data changes: members 0 and 2 keep their gradients exactly
    g2 = stacked_grads(x2)
    for n in g:
        assert torch.equal(g[n][0], g2[n][0]) and torch.equal(g[n][2], g2[n][2])
    assert not torch.equal(g["head.weight"][1], g2["head.weight"][1])


@pytest.mark.slow
def test_vmap_sweep_close_to_basic(tmp_path):
    """forward=vmap on the CPU: the same jobs and statuses; matrices within a few test samples of the
    basic launcher's (rounding differences grow during training; bench_sweep.py measures them)."""
    args = [*SHORT, "method=ewc", "lambda=10,1000"]
    _sweep(tmp_path / "basic", *args, vectorized=False)
    log = _sweep(tmp_path / "vec", *args, "hydra.launcher.forward=vmap", vectorized=True)
    assert _stacked_groups(log) == 1
    a, b = _jobs(tmp_path / "basic"), _jobs(tmp_path / "vec")
    assert a.keys() == b.keys()
    for job in a:
        assert b[job]["status"] == "ok"
        diff = max(
            abs(u - v)
            for ra, rb in zip(a[job]["accuracy_matrix"], b[job]["accuracy_matrix"], strict=True)
            for u, v in zip(ra, rb, strict=True)
        )
        assert diff <= 0.05, (job, diff)


@pytest.mark.slow
def test_launcher_ships_in_the_wheel(installed_site):
    assert (installed_site / "hydra_plugins" / "cl_runner_launcher" / "vectorized_launcher.py").is_file()
    assert (installed_site / "cl_runner" / "configs" / "hydra" / "launcher" / "vectorized.yaml").is_file()
    assert (installed_site / "cl_runner" / "stacked.py").is_file()


def _open_group(forward, cfgs, folders):
    """A stacked group of runs opened as the vectorized launcher opens them (each run's phases,
    advanced to its first training request)."""
    from cl_runner import stacked
    from cl_runner.run import run_phases

    group = stacked.Group(forward)
    for cfg, folder in zip(cfgs, folders, strict=True):
        phases = run_phases(cfg, folder)
        group.add(phases, next(phases))
    return group


@pytest.mark.slow
def test_interrupted_group_resumes_to_the_same_matrices(tmp_path, compose_cfg, one_thread, monkeypatch):
    """Ctrl-C while a group trains task 2: every member saves its finished task as `interrupted`
    with its checkpoint; running the group again resumes all of them (together) and ends with the
    matrices of uninterrupted separate runs."""
    from cl_runner.run import RunStopped, run_experiment
    from cl_runner.trainer import Trainer

    cfgs = [compose_cfg(*SHORT, "method=ewc", f"lambda={v}") for v in (1, 1000)]
    ref = [run_experiment(c, tmp_path / f"ref{i}")["accuracy_matrix"] for i, c in enumerate(cfgs)]
    folders = [tmp_path / f"vec{i}" for i in range(len(cfgs))]
    real = Trainer.train_task  # forward=loop: each member's task by the trainer's own loop

    def ctrl_c_at_task_2(self, request):
        if request.t == 1:
            raise KeyboardInterrupt
        return real(self, request)

    monkeypatch.setattr(Trainer, "train_task", ctrl_c_at_task_2)
    group = _open_group("loop", cfgs, folders)
    members = group.run()
    assert group.interrupted
    for i, m in enumerate(members):
        assert isinstance(m.error, RunStopped) and m.error.status == "interrupted"
        saved = json.loads((tmp_path / f"vec{i}" / "metrics.json").read_text())
        assert saved["status"] == "interrupted" and saved["tasks_done"] == 1
        assert saved["accuracy_matrix"] == ref[i][:1]
        assert (tmp_path / f"vec{i}" / "checkpoint.pt").is_file()
    monkeypatch.setattr(Trainer, "train_task", real)
    group = _open_group("loop", cfgs, folders)
    members = group.run()
    assert group.trained_together == 2  # tasks 2 and 3, both members at once
    for i, m in enumerate(members):
        assert m.error is None, m.error
        assert m.result["status"] == "ok" and m.result["accuracy_matrix"] == ref[i]


@pytest.mark.slow
def test_vmap_members_run_in_one_thread_on_the_jobs_threads(tmp_path, compose_cfg, monkeypatch):
    """forward=vmap: the group has no threads of its own; every member's importance passes and
    evaluations run in the main thread on the jobs' `threads`; the members' stacked Adam is the fused
    CPU kernel; results stay those of separate runs to rounding."""
    import threading

    from cl_runner import stacked, trainer
    from cl_runner.methods.ewc import EWC
    from cl_runner.run import run_experiment

    cfgs = [compose_cfg(*SHORT, "method=ewc", f"lambda={v}", "threads=2") for v in (1, 1000)]
    ref = [run_experiment(c, tmp_path / f"ref{i}")["accuracy_matrix"] for i, c in enumerate(cfgs)]
    where: dict[str, list] = {"after_task": [], "evaluate": [], "fused": []}

    def spy(name, real):
        def wrapped(*args, **kwargs):
            where[name].append((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(EWC, "after_task", spy("after_task", EWC.after_task))
    monkeypatch.setattr(trainer, "evaluate", spy("evaluate", trainer.evaluate))
    real_opt = stacked._stacked_optimizer

    def record(*args):
        opt = real_opt(*args)
        where["fused"].append(opt.param_groups[0]["fused"])
        return opt

    monkeypatch.setattr(stacked, "_stacked_optimizer", record)
    group = _open_group("vmap", cfgs, [tmp_path / f"vec{i}" for i in range(len(cfgs))])
    members = group.run()
    assert group.trained_together == 3
    # 2 members x 2 Fishers (none after the last task); evaluations: initial + after each of the 3 tasks
    assert where["after_task"] == [(True, 2)] * 4
    assert where["evaluate"] == [(True, 2)] * 8
    assert where["fused"] == [True] * 3
    for i, m in enumerate(members):
        assert m.error is None, m.error
        got = m.result["accuracy_matrix"]
        assert max(abs(a - b) for ra, rb in zip(ref[i], got, strict=True) for a, b in zip(ra, rb, strict=True)) <= 0.05
