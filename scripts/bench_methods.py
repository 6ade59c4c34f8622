"""Benchmark the methods' costs on MNIST-sized data (issue 3).

1. Per-step overhead: time of one training step (forward, task-loss backward, the method's hooks,
   fused λ·penalty gradient, Adam step) for each method with its penalty active, versus finetune;
   replay's step trains on the batch plus as many memory samples (twice the samples) and updates
   the reservoir.
   Model MLP 1024-400-400-10 (Hsu et al.'s padded MNIST), batch 128, Adam lr 1e-3. EWC is timed
   with 1 and with 4 consolidated tasks (one penalty term per past task).
2. Importance passes on N (default 60,000) samples: the EWC Fisher with fisher_labels=all (exact
   expectation over the 10 classes) and pred, and MAS (per-sample), by the Linear closed form that
   this MLP takes, and by the generic torch.func path on --func-samples samples (with the per-sample
   time and its extrapolation to 60,000; it is linear in the number of samples).

   DER, DER++ and ER-ACE replay 128 memory samples per step (DER++: two draws of 128), as the DER
   table's P-MNIST setting, from a memory of 500. GDumb trains nothing per step (part 4).
3. The curvature demonstration's CNN ("D3", docs/protocols/curvature.md; ``model=cnn_d3``, 2,980 parameters,
   30 outputs, 28×28 MNIST, SGD lr 0.002,
   batch 256, class-IL units of task 2): per-step time of EWC with ``method.fisher`` diag / kfac /
   dense (1 and 2 past tasks) as a ratio to finetune; the Fisher of --d3-samples samples in each
   representation (labels all over 10 units and sample), and one natural-gradient preconditioning
   (Fisher of a 512-sample batch + solve, damping 0.01) per representation.

4. GDumb (no training steps of its own): the greedy class-balanced sampler over the --samples images
   (memory 500, 10 classes), and one fit from scratch on the full memory (--gdumb-epochs passes,
   batch 16, SGD momentum 0.9, SGDR: the authors' MNIST values) that precedes every evaluation.

Data: the MNIST training images read by the package's loader from ``<data_dir>`` (torchvision's
layout; padded to 32×32, normalized with Hsu et al.'s mean 0.1 / std 0.2752) when present, random
tensors of the same shape otherwise. Usage::

    python scripts/bench_methods.py [--data-dir /work/shared/data] [--threads 1] [--device cpu]
        [--steps 200] [--samples 60000] [--func-samples 2000] [--fisher-batch 32 64]
        [--skip-d3] [--only-d3] [--d3-samples 2000] [--skip-gdumb] [--gdumb-epochs 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

from cl_runner import curvature
from cl_runner.curvature import estimators as per_sample
from cl_runner.curvature.estimators import FAST_CHUNK, fisher_diagonal, mas_importance
from cl_runner.data import transforms as T
from cl_runner.data.datasets import DatasetUnavailable, load_dataset
from cl_runner.data.stream import Task, TaskStream
from cl_runner.methods import build_method, eval_mode
from cl_runner.models import MLP, SmallCNN
from cl_runner.trainer import Trainer

METHODS = [
    ("finetune", {}, 0),
    ("l2", {}, 1),
    ("ewc", {"fisher_samples": 256}, 1),
    ("ewc", {"fisher_samples": 256}, 4),
    ("online_ewc", {"fisher_samples": 256}, 4),
    ("mas", {"mas_samples": 256}, 1),
    ("si", {"grad": "task"}, 1),
    ("si", {"grad": "total"}, 1),
    ("rwalk", {}, 1),
    ("scp", {"scp_samples": 256}, 1),
    ("replay", {}, 0),  # batch 128 + 128 replayed from a full memory of 1000 (filled during the warm-up)
    ("lwf", {}, 1),  # + the frozen copy's forward (distillation of the shared head: domain layout)
    ("agem", {"buffer_size": 500}, 4),  # + forward/backward of 128 memory samples, projection
    ("gem", {"buffer_size": 200}, 4),  # 5 tasks: 4 memories of 40
    ("gem", {"buffer_size": 200}, 19),  # 20 tasks: 19 memories of 10 (the DER table's 200)
    ("gem", {"buffer_size": 500}, 19),  # 20 tasks: 19 memories of 25 (the DER table's 500)
    ("icarl", {"buffer_size": 500}, 1),  # BCE; domain layout: no old classes, so no frozen-copy forward
    # P-MNIST's DER-table setting (mammoth best_args: --minibatch_size 128 at batch 128), memory of 500
    ("der", {"replay_batch": 128}, 0),  # + 128 memory samples (logit MSE)
    ("derpp", {"replay_batch": 128}, 0),  # + 2 × 128 memory samples (logit MSE; labels' CE)
    ("er_ace", {"replay_batch": 128}, 0),  # + 128 memory samples; masked CE on the batch
]
NO_STRENGTH = ("finetune", "replay", "agem", "gem", "icarl", "der", "derpp", "er_ace")


def load_images(data_dir: str | None, n: int) -> tuple[torch.Tensor, str]:
    """MNIST's first ``n`` training images through the package's loader, padded to 32×32 and
    normalized like Hsu et al.; random tensors of the same shape when MNIST is not on disk."""
    try:
        raw = load_dataset("mnist", data_dir or ".", download=False, seed=0)
    except DatasetUnavailable:
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, 1, 32, 32, generator=g), "random tensors (MNIST not found)"
    return (T.pad(raw.x_train[:n], 32) - 0.1) / 0.2752, f"MNIST ({data_dir})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_timer(trainer, data, opt, device, steps, warmup):
    """A function that runs ``warmup`` steps of the trainer's own loop, then returns ms per step of ``steps``."""

    from cl_runner.trainer import TaskTraining

    trainer.optimizer = opt

    def run_once() -> float:
        trainer.train_task(TaskTraining(trainer, 0, data, warmup))
        sync(device)
        t0 = time.perf_counter()
        trainer.train_task(TaskTraining(trainer, 0, data, steps))
        sync(device)
        return (time.perf_counter() - t0) / steps * 1e3

    return run_once


def make_stepper(name, options, n_tasks, x, y, device, steps, warmup):
    """A function that times ``steps`` training steps (after ``warmup``) of ``name`` with its
    penalty holding ``n_tasks`` consolidated tasks; returns ms/step."""
    torch.manual_seed(0)
    model = MLP((1, 32, 32), 10).to(device)
    method = build_method(name, None if name in NO_STRENGTH else 1.0, options)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    units = (0, 10)
    tasks = [Task(t, f"t{t}", x[:512], y[:512], x[:10], y[:10], list(range(10)), units, units) for t in range(n_tasks)]
    task = Task(n_tasks, "bench", x, y, x[:10], y[:10], list(range(10)), units, units)
    method.setup(model, TaskStream("bench", "domain", [*tasks, task], 10, (1, 32, 32)))
    for task_t in tasks:  # consolidate n_tasks tasks so the penalty has its terms
        method.before_task(model, task_t)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        method.after_task(model, task_t)
    method.before_task(model, task)
    # the trainer's own step loop (cl_runner/trainer.py), on this one task
    trainer = Trainer(model, method, None, lambda m: opt, batch_size=128, iterations=steps, seed=1)
    data = method.training_data(TaskStream("bench", "domain", [task], 10, (1, 32, 32)), 0)

    return step_timer(trainer, data, opt, device, steps, warmup)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("CL_RUNNER_DATA", "/work/shared/data"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5, help="step timing: median of this many runs")
    ap.add_argument("--samples", type=int, default=60000, help="samples for the importance passes")
    ap.add_argument("--fisher-batch", type=int, nargs="+", default=[16], help="torch.func chunk sizes")
    ap.add_argument(
        "--func-samples", type=int, default=2000, help="samples for the (slow) torch.func path on CPU; 0 skips it"
    )
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--skip-fisher", action="store_true")
    ap.add_argument("--skip-d3", action="store_true")
    ap.add_argument("--only-d3", action="store_true", help="only part 3 (D3 CNN)")
    ap.add_argument("--d3-samples", type=int, default=2000, help="samples for the D3 Fisher timings")
    ap.add_argument("--skip-gdumb", action="store_true")
    ap.add_argument("--gdumb-epochs", type=int, default=128, help="passes of GDumb's fit (the authors' MNIST: 128)")
    args = ap.parse_args(argv)
    if args.only_d3:
        args.skip_steps = args.skip_fisher = args.skip_gdumb = True
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, source = load_images(args.data_dir, max(args.samples, 1024))
    x = x.to(device)
    y = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(2)).to(device)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"torch={torch.__version__} threads={torch.get_num_threads()} device={device}"
    )
    print(
        f"data: {source}, x {tuple(x.shape)}; model MLP 1024-400-400-10 "
        f"({sum(p.numel() for p in MLP((1, 32, 32), 10).parameters()):,} parameters)"
    )

    if not args.skip_steps:
        print(f"\nper-step time, batch 128, Adam, λ=1 (median of {args.repeats} × {args.steps} steps)")
        print(f"{'method':<12} {'options':<24} {'past tasks':>10} {'ms/step':>9} {'× finetune':>11}")
        steppers = [make_stepper(n, o, k, x, y, device, args.steps, args.warmup) for n, o, k in METHODS]
        times: list[list[float]] = [[] for _ in METHODS]
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits every method alike
            for i, run_once in enumerate(steppers):
                times[i].append(run_once())
        base = statistics.median(times[0])
        for (name, options, n_tasks), ts in zip(METHODS, times, strict=True):
            ms = statistics.median(ts)
            opts = ",".join(f"{k}={v}" for k, v in options.items() if k in ("grad", "buffer_size"))
            print(f"{name:<12} {opts:<24} {n_tasks:>10} {ms:>9.2f} {ms / base:>11.2f}", flush=True)

    if not args.skip_fisher:
        torch.manual_seed(0)
        model = MLP((1, 32, 32), 10).to(device)
        print(
            "\nimportance passes (eval mode, 10 active units); 'closed form' = the Linear-layer path,"
            " 'torch.func' = vmap per-sample gradients (any model), timed on --func-samples samples"
        )
        print(f"{'pass':<26} {'path':<12} {'chunk':>6} {'samples':>8} {'seconds':>9} {'µs/sample':>10} {'→ 60k s':>8}")
        passes = (
            ("EWC Fisher, labels=all", lambda xs, ys, b: fisher_diagonal(model, xs, ys, (0, 10), "all", b)),
            ("EWC Fisher, labels=pred", lambda xs, ys, b: fisher_diagonal(model, xs, ys, (0, 10), "pred", b)),
            ("MAS, per_sample", lambda xs, ys, b: mas_importance(model, xs, (0, 10), True, b)),
        )
        runs = [(True, args.samples, FAST_CHUNK)]
        runs += [(False, args.func_samples, b) for b in args.fisher_batch if args.func_samples]
        for fast, n, batch in runs:
            per_sample.FAST_LINEAR = fast
            xs, ys = x[:n], y[:n]
            for label, fn in passes:
                with eval_mode(model):
                    sync(device)
                    t0 = time.perf_counter()
                    fn(xs, ys, batch)
                    sync(device)
                    dt = time.perf_counter() - t0
                path = "closed form" if fast else "torch.func"
                print(
                    f"{label:<26} {path:<12} {batch:>6} {n:>8,} {dt:>9.2f} {dt / n * 1e6:>10.1f} "
                    f"{dt / n * 60000:>8.1f}",
                    flush=True,
                )
        per_sample.FAST_LINEAR = True

    if not args.skip_d3:
        bench_d3(args, device)

    if not args.skip_gdumb:
        bench_gdumb(args, x, y, device)


# ---- 3. D3's CNN: structured-Fisher EWC per step, Fisher and preconditioning times ---------------


def load_d3_images(data_dir: str | None, n: int) -> tuple[torch.Tensor, str]:
    """MNIST 28×28 normalized with MNIST's mean/std through the package's loader, or random tensors."""
    try:
        raw = load_dataset("mnist", data_dir or ".", download=False, seed=0)
    except DatasetUnavailable:
        return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)), "random tensors"
    return (raw.x_train[:n] - 0.1307) / 0.3081, f"MNIST ({data_dir})"


def d3_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN((1, 28, 28), 30, head_bias=False).to(device)  # configs/model/cnn_d3.yaml


D3_STEPS = [("finetune", {}, 0)] + [("ewc", {"fisher": k}, t) for k in ("diag", "kfac", "dense") for t in (1, 2)]


def make_d3_stepper(name, options, n_tasks, x, y, device, steps, warmup):
    """Like :func:`make_stepper` for D3: SGD lr 0.002, batch 256, the Fisher of each past task from
    512 samples, then timed steps on class-IL units (0, 10 · (n_tasks + 1))."""
    model = d3_model(device)
    method = build_method(
        name, None if name == "finetune" else 10.0, {**options, "fisher_samples": 512} if options else {}
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.002)
    method.setup(model, None)
    for t in range(n_tasks):
        units = (0, 10 * (t + 1))
        task = Task(t, f"t{t}", x[:512], y[:512] + 10 * t, x[:10], y[:10], list(range(10)), units, units)
        method.before_task(model, task)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-2 * torch.randn_like(p))
        method.after_task(model, task)
    units = (0, 10 * (n_tasks + 1))
    task = Task(n_tasks, "bench", x, y + 10 * n_tasks, x[:10], y[:10], list(range(10)), units, units)
    method.before_task(model, task)
    trainer = Trainer(model, method, None, lambda m: opt, batch_size=256, iterations=steps, seed=1)
    data = method.training_data(TaskStream("bench", "class", [task], 30, (1, 28, 28)), 0)

    return step_timer(trainer, data, opt, device, steps, warmup)


def _timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_d3(args, device: torch.device) -> None:
    x, source = load_d3_images(args.data_dir, max(args.d3_samples, 4096))
    x = x.to(device)
    y = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(2)).to(device)
    n_params = sum(p.numel() for p in d3_model(device).parameters())
    print(f"\nD3 CNN (model=cnn_d3, {n_params:,} parameters), data: {source}")
    steps = max(20, args.steps // 4)
    print(f"per-step time, batch 256, SGD lr 0.002, λ=10 (median of {args.repeats} × {steps} steps)")
    print(f"{'method':<10} {'fisher':<8} {'past tasks':>10} {'ms/step':>9} {'× finetune':>11}")
    steppers = [make_d3_stepper(n, o, k, x, y, device, steps, args.warmup) for n, o, k in D3_STEPS]
    times: list[list[float]] = [[] for _ in D3_STEPS]
    for _ in range(args.repeats):
        for i, run_once in enumerate(steppers):
            times[i].append(run_once())
    base = statistics.median(times[0])
    for (name, options, n_tasks), ts in zip(D3_STEPS, times, strict=True):
        ms = statistics.median(ts)
        print(f"{name:<10} {options.get('fisher', ''):<8} {n_tasks:>10} {ms:>9.2f} {ms / base:>11.2f}", flush=True)

    model = d3_model(device)
    n = args.d3_samples
    xs, ys = x[:n], y[:n]
    print(f"\nFisher of {n:,} samples, 10 active units (eval mode); '→ 60k' extrapolates linearly")
    print(f"{'representation':<34} {'labels':<7} {'seconds':>8} {'µs/sample':>10} {'→ 60k s':>8}")
    runs = [
        (
            "diag (EWC's own path)",
            "all",
            lambda lab: per_sample.fisher_diagonal(model, xs, ys, (0, 10), lab, 16),
        ),
    ]
    runs += [
        (
            f"{k} (curvature.fisher)",
            None,
            lambda lab, k=k: curvature.fisher(model, xs, (0, 10), kind=k, labels=lab, y=ys),
        )
        for k in curvature.KINDS
    ]
    for label, only, fn in runs:
        for labels in (only,) if only else ("all", "sample"):
            with eval_mode(model):
                dt = _timed(lambda fn=fn, labels=labels: fn(labels), device)
            print(f"{label:<34} {labels:<7} {dt:>8.2f} {dt / n * 1e6:>10.1f} {dt / n * 60000:>8.1f}", flush=True)

    print("\nnatural-gradient step: Fisher of a 512-sample batch (20 active units) + solve, damping 0.01")
    print(f"{'representation':<14} {'labels':<7} {'fisher ms':>10} {'solve ms':>9}")
    xb, yb = x[:512], y[:512]
    grads = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    for kind in curvature.KINDS:
        for labels in ("sample", "all"):
            f_times, s_times = [], []
            for _ in range(3):
                holder = {}
                f_times.append(
                    _timed(
                        lambda kind=kind, labels=labels, holder=holder: holder.update(
                            f=curvature.fisher(model, xb, (0, 20), kind=kind, labels=labels, y=yb)
                        ),
                        device,
                    )
                )
                s_times.append(_timed(lambda holder=holder: holder["f"].solve(grads, 0.01), device))
            fm, sm = statistics.median(f_times) * 1e3, statistics.median(s_times) * 1e3
            print(f"{kind:<14} {labels:<7} {fm:>10.1f} {sm:>9.1f}", flush=True)


# ---- 4. GDumb: the sampler over a stream and one fit on the memory -------------------------------------


def bench_gdumb(args, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
    units = (0, 10)
    task = Task(0, "bench", x, y, x[:10], y[:10], list(range(10)), units, units)
    stream = TaskStream("bench", "domain", [task], 10, (1, 32, 32))
    torch.manual_seed(0)
    model = MLP((1, 32, 32), 10).to(device)
    gdumb = build_method("gdumb", None, {"buffer_size": 500, "fit_epochs": args.gdumb_epochs})
    gdumb.setup(model, stream, seed=0)
    t_sampler = _timed(lambda: gdumb.training_data(stream, 0), device)
    t_fit = _timed(lambda: gdumb.fit(0), device)
    steps = args.gdumb_epochs * -(-len(gdumb.buffer) // 16)
    print(f"\nGDumb, memory 500 of {len(x):,} samples (10 classes), MLP 1024-400-400-10")
    print(f"{'part':<34} {'seconds':>8} {'per unit':>16}")
    print(f"{'sampler (whole stream, once)':<34} {t_sampler:>8.2f} {t_sampler / len(x) * 1e6:>11.2f} µs/sample")
    fit = f"fit ({args.gdumb_epochs} passes, {steps} steps)"
    print(f"{fit:<34} {t_fit:>8.2f} {t_fit / steps * 1e3:>11.2f} ms/step")


if __name__ == "__main__":
    sys.exit(main())
