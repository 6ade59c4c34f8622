"""Runner overhead benchmark: cl-runner's finetune training loop vs a plain PyTorch loop.

Both train the same MLP with the same batch size, optimizer and number of steps on permuted-MNIST
data of MNIST size (the real MNIST when ``--data-dir`` holds it, random tensors of the same shape
otherwise). Runs alternate and the median of ``--repeats`` is reported, as a ratio
(runner / plain; target ≤ 1.15 on CPU).

    python scripts/bench_runner.py --data-dir ../shared/data            # CPU or GPU (auto)
    python scripts/bench_runner.py --device cpu --steps 300 --repeats 3  # quick

It also times one whole ``cl-run`` process (Python start-up, imports, data, training, Fisher,
evaluation, files) on the issue-13 workload: permuted MNIST, 3 tasks, MLP 784-400-400, SGD 0.01
momentum 0.9, batch 128, 1 epoch per task, EWC λ = 100 with the empirical Fisher, 2 threads
(``--whole-repeats 0`` skips it; target ≤ 12 s on a quiet 2-core CPU).

``--load`` measures runs under load instead (issue 20: PyTorch's default of one OpenMP thread per core
spins against other processes): the offline default ``cl-run`` (whole processes) alone and two at
once, with ``threads`` unset (PyTorch's default), ``threads=1`` and ``threads=auto`` (cl-run's
default), ``--load-repeats`` times each; it prints each setting's median wall time per run::

    python scripts/bench_runner.py --load --load-repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cl_runner.data.stream import Task, TaskStream
from cl_runner.methods.finetune import Finetune
from cl_runner.models.mlp import MLP
from cl_runner.runfiles import save_checkpoint
from cl_runner.trainer import TaskTraining, Trainer, evaluate


def permuted_mnist_stream(data_dir: str | None, n_tasks: int, device: torch.device) -> tuple[TaskStream, str]:
    """The runner's own permuted-MNIST stream when MNIST is on disk, else same-shaped random data."""
    if data_dir and (Path(data_dir) / "MNIST" / "raw").exists():
        from cl_runner.data.benchmarks import build_stream

        cfg = {"name": "permuted_mnist", "kind": "permuted", "dataset": "mnist", "n_tasks": n_tasks}
        return build_stream(cfg, "domain", 0, device, data_dir, download=False), "MNIST (real)"
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(n_tasks):
        x = torch.rand(60000, 1, 28, 28, generator=g).to(device)
        y = torch.randint(0, 10, (60000,), generator=g).to(device)
        tasks.append(Task(t, f"rand{t}", x, y, x[:10000], y[:10000], list(range(10)), (0, 10), (0, 10)))
    return TaskStream("random", "domain", tasks, 10, (1, 28, 28)), "random tensors of MNIST shape"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(x, y, hidden, steps, batch_size, lr, device) -> float:
    """What a researcher would write by hand: tensors in memory, randperm, index, step."""
    torch.manual_seed(0)
    model = MLP(tuple(x.shape[1:]), 10, hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    sync(device)
    start = time.perf_counter()
    step = 0
    while step < steps:
        perm = torch.randperm(len(y), generator=g).to(device)
        for idx in perm.split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    sync(device)
    return time.perf_counter() - start


def runner_loop(stream, hidden, steps, batch_size, lr, device) -> tuple[float, float, float]:
    """cl-runner's Trainer on one task: (training-loop seconds, evaluation seconds, seconds to save
    the task's checkpoint as a run does after every task: model, optimizer, method, generators)."""
    torch.manual_seed(0)
    model = MLP(stream.input_shape, stream.n_outputs, hidden).to(device)
    one = TaskStream(stream.name, stream.scenario, stream.tasks[:1], stream.n_outputs, stream.input_shape)
    trainer = Trainer(
        model,
        Finetune(),
        one,
        lambda m: torch.optim.Adam(m.parameters(), lr=lr),
        batch_size=batch_size,
        iterations=steps,
        seed=0,
    )
    trainer.method.setup(model, one)
    trainer.optimizer = trainer.make_optimizer(model)
    data = trainer.method.training_data(one, 0)
    sync(device)
    start = time.perf_counter()
    trainer.train_task(TaskTraining(trainer, 0, data, steps))  # includes reading the losses back once
    sync(device)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate(model, stream, 0)
    sync(device)
    eval_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        save_checkpoint(folder, {"trainer": trainer.state_dict()})
        checkpoint_s = time.perf_counter() - start
    return train_s, eval_s, checkpoint_s


#: the fixed-cost workload of issue 13 (one whole cl-run process)
WHOLE = [
    "benchmark=permuted_mnist",
    "benchmark.n_tasks=3",
    "model=mlp",
    "optimizer=sgd",
    "optimizer.lr=0.01",
    "optimizer.momentum=0.9",
    "batch_size=128",
    "epochs=1",
    "method=ewc",
    "lambda=100",
    "method.fisher_labels=true",
    "threads=2",
]


def whole_process(data_dir: str, device: str) -> tuple[float, float]:
    """Wall time of one ``cl-run`` process on the WHOLE workload, and the run's own wall time."""
    import json

    with tempfile.TemporaryDirectory() as folder:
        cmd = [sys.executable, "-c", "from cl_runner.app import cli; cli()", *WHOLE]
        cmd += [f"data_dir={data_dir}", "download=false", f"device={device}", f"hydra.run.dir={folder}/run"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"cl-run failed: {proc.stderr[-2000:]}")
        inside = json.loads((Path(folder) / "run" / "metrics.json").read_text())["wall_time_s"]
    return wall, inside


def _processes(args: list[str], n: int) -> list[float]:
    """Wall time of each of ``n`` ``cl-run`` processes with ``args`` started at the same moment."""
    with tempfile.TemporaryDirectory() as folder:
        procs, starts = [], []
        for i in range(n):
            cmd = [sys.executable, "-c", "from cl_runner.app import cli; cli()", *args, f"hydra.run.dir={folder}/{i}"]
            starts.append(time.perf_counter())
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        times = []
        for p, t0 in zip(procs, starts, strict=True):
            _, err = p.communicate()
            if p.returncode != 0:
                sys.exit(f"cl-run failed: {err[-2000:]}")
            times.append(time.perf_counter() - t0)
    return times


LOAD_SETTINGS = {"PyTorch's default": ["threads=null"], "threads=1": ["threads=1"], "threads=auto": ["threads=auto"]}


def load(repeats: int) -> None:
    """The offline default run alone and two at once, per thread setting (medians over the repeats)."""
    print(f"{'setting':<20} {'alone':>9} {'two at once (each)':>20}   (median wall time of whole cl-run processes, s)")
    for name, args in LOAD_SETTINGS.items():
        alone, two = [], []
        for _ in range(repeats):  # interleaved: a drift of the machine's load hits every setting alike
            alone += _processes(args, 1)
            two += _processes(args, 2)
        print(f"{name:<20} {statistics.median(alone):>9.1f} {statistics.median(two):>20.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--hidden", type=int, nargs="+", default=[400, 400])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=2, help="tasks in the stream (evaluation covers all)")
    ap.add_argument("--whole-repeats", type=int, default=1, help="whole cl-run processes to time (0: none)")
    ap.add_argument("--load", action="store_true", help="runs alone and two at once per thread setting, then stop")
    ap.add_argument("--load-repeats", type=int, default=3)
    args = ap.parse_args()
    if args.load:
        return load(args.load_repeats)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    start = time.perf_counter()
    stream, source = permuted_mnist_stream(args.data_dir, args.tasks, device)
    sync(device)
    build_s = time.perf_counter() - start
    x, y = stream[0].x_train, stream[0].y_train
    common = dict(hidden=args.hidden, steps=args.steps, batch_size=args.batch_size, lr=1e-3, device=device)

    plain_loop(x, y, **{**common, "steps": 20})  # warm-up (allocator, kernels)
    runner_loop(stream, **{**common, "steps": 20})
    plain, runner, evals, ckpts = [], [], [], []
    for _ in range(args.repeats):
        plain.append(plain_loop(x, y, **common))
        r, e, c = runner_loop(stream, **common)
        runner.append(r)
        evals.append(e)
        ckpts.append(c)
    p, r, e = statistics.median(plain), statistics.median(runner), statistics.median(evals)
    c = statistics.median(ckpts)
    n_test = sum(len(t.y_test) for t in stream)
    print(f"device: {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}")
    print(f"data: {source}; {len(stream)} tasks built and moved to the device in {build_s:.2f}s")
    print(
        f"model: MLP {x[0].numel()}-{'-'.join(map(str, args.hidden))}-10, Adam, batch {args.batch_size}, "
        f"{args.steps} steps, median of {args.repeats}"
    )
    print(f"plain PyTorch loop : {p:.3f}s  ({1000 * p / args.steps:.2f} ms/step)")
    print(f"cl-runner Trainer  : {r:.3f}s  ({1000 * r / args.steps:.2f} ms/step)")
    print(f"ratio runner/plain : {r / p:.3f}  (target <= 1.15)")
    print(
        f"checkpoint per task: {1000 * c:.1f} ms; runner + one checkpoint per {args.steps} steps / plain: "
        f"{(r + c) / p:.3f}  (target <= 1.10)"
    )
    print(f"evaluation of {n_test} test images on {len(stream)} tasks: {e:.3f}s")
    if args.whole_repeats > 0 and (Path(args.data_dir) / "MNIST" / "raw").exists():
        times = [whole_process(args.data_dir, str(device)) for _ in range(args.whole_repeats)]
        wall, inside = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
        print(
            f"whole cl-run process (issue 13 workload, median of {args.whole_repeats}): {wall:.1f}s, "
            f"{inside:.1f}s inside the run  (target <= 12 s)"
        )
        print("  cl-run " + " ".join(WHOLE) + f" data_dir={args.data_dir} download=false")


if __name__ == "__main__":
    main()
