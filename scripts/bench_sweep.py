"""Sweep benchmark: the same λ sweep with the basic launcher (jobs one after another in one process)
and with the vectorized launcher (``hydra/launcher=vectorized``); wall time of each whole ``cl-run``
process, the ratio, and how far each job's accuracy matrix is from the basic launcher's.

    python scripts/bench_sweep.py default                      # 16-value EWC λ sweep, offline default
    python scripts/bench_sweep.py mnist --data-dir ../shared/data   # 8 values, permuted MNIST 784-400-400
    python scripts/bench_sweep.py default --forward vmap loop  # compare the two stacked forwards

Targets (issue 13, CPU): default ≤ 0.25×, mnist ≤ 0.8× the basic launcher's time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_runner import WHOLE  # scripts/ is on sys.path when a script runs

LAMBDAS = {
    "default": [0.1 * 2**i for i in range(16)],
    # SGD 0.01 with momentum 0.9: λ = 1e4 diverges in task 2 (lr·λ·F too large), a row but not a timing
    "mnist": [10.0**i for i in range(-4, 4)],
}
SETTINGS = {
    "default": ["method=ewc"],
    # issue 13's fixed-cost workload (bench_runner.WHOLE) without its λ and thread count
    "mnist": [a for a in WHOLE if not a.startswith(("lambda=", "threads="))],
}


def run(args: list[str], folder: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(["cl-run", "-m", *args, f"hydra.sweep.dir={folder}"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    # exit 1 with a summary: a job diverged or failed, which is still a timed sweep (its row says so)
    if proc.returncode != 0 and not (proc.returncode == 1 and (folder / "summary.csv").is_file()):
        sys.exit(f"cl-run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def matrices(folder: Path) -> dict[str, list[list[float]]]:
    return {p.parent.name: json.loads(p.read_text())["accuracy_matrix"] for p in sorted(folder.glob("*/metrics.json"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=sorted(SETTINGS))
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forward", nargs="+", default=["auto"], choices=["auto", "loop", "vmap"])
    ap.add_argument("--members", type=int, default=None, help="first N λ values only (quick runs)")
    args = ap.parse_args()
    lambdas = LAMBDAS[args.workload][: args.members]
    common = [*SETTINGS[args.workload], "lambda=" + ",".join(f"{v:g}" for v in lambdas), f"threads={args.threads}"]
    if args.workload == "mnist":
        common += [f"data_dir={args.data_dir}", "download=false"]
    print(f"workload: {args.workload}, {len(lambdas)} λ values, threads={args.threads}")
    print("command: cl-run -m " + " ".join(common))
    with tempfile.TemporaryDirectory() as tmp:
        basic = run(common, Path(tmp) / "basic")
        ref = matrices(Path(tmp) / "basic")
        print(f"basic launcher      : {basic:7.1f} s  (whole process)")
        for forward in args.forward:
            folder = Path(tmp) / f"vectorized_{forward}"
            wall = run([*common, "hydra/launcher=vectorized", f"hydra.launcher.forward={forward}"], folder)
            got = matrices(folder)
            diff = max(
                abs(a - b)
                for job in ref
                for ra, rb in zip(ref[job], got[job], strict=True)
                for a, b in zip(ra, rb, strict=True)
            )
            same = sum(ref[job] == got[job] for job in ref)
            print(
                f"vectorized ({forward:>4}) : {wall:7.1f} s  ratio {wall / basic:.3f}; "
                f"{same}/{len(ref)} matrices bitwise equal, largest cell difference {100 * diff:.2f} points"
            )


if __name__ == "__main__":
    main()
