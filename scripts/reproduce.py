#!/usr/bin/env python
"""Run experiment presets for a list of methods × seeds and print the table of final average
accuracy (ACC: mean test accuracy over all tasks after the last task), mean ± std over seeds.

Each (preset, method entry) is one Hydra multirun of the runner over the seeds::

    cl-run -m experiment=<preset> <method overrides> seed=0,1,2 hydra.sweep.dir=<out>/<preset>/<label> <extra>

and the table is a view of the multiruns' summaries (``cl_runner.report.summary``: ``collect`` reads every
job's ``metrics.json`` back from disk, ``group`` gives the mean ± std over the seeds).

Method entries:
  ``ewc``                         → ``method=ewc``
  ``finetune_sgd``                → ``method=finetune optimizer=sgd`` (Hsu et al.'s plain-SGD baseline;
                                    the presets leave the learning rate to the optimizer group, whose
                                    sgd.yaml default is Hsu's 0.01)
  ``LABEL:OVERRIDE OVERRIDE …``   → any other row, e.g. ``"sgd_lr0.1:method=finetune optimizer=sgd optimizer.lr=0.1"``

Example (protocol A on the real MNIST of this machine)::

    python scripts/reproduce.py hsu2018_split_mnist_mlp400_task hsu2018_split_mnist_mlp400_domain \\
        hsu2018_split_mnist_mlp400_class \\
        --seeds 0 1 2 -- data_dir=/work/shared/data download=false

Memory sizes (``--buffers``): a method whose protocol file in a preset holds best arguments per memory size
(a table ``_best``: the der2020_* presets' replay, der, derpp, …) becomes one row per size given,
``<label>@<size>`` with ``buffer=<size>``; the other methods stay one row (they ignore ``buffer``). The DER
table's S-MNIST column::

    python scripts/reproduce.py der2020_seq_mnist --methods finetune online_ewc si lwf joint replay gem agem \\
        icarl der derpp --buffers 200 500 5120 --seeds 0 1 2 -- data_dir=/work/shared/data download=false

Outputs: the markdown table on stdout (rows = method entries, columns = presets, cells =
ACC ×100 mean ± sample std (n−1) over the seeds whose run finished, 2 decimals), and in ``--out``:
``results.csv`` (one row per preset × method: n_ok, n_failed, mean, std, mean wall time) and
``results.md``. Failed runs are counted and listed, never averaged in.

Runs default to one CPU thread each (``--threads 1`` sets OMP_NUM_THREADS/MKL_NUM_THREADS): on a
small shared machine, PyTorch's default of one thread per core made these small MLPs ten times
slower through thread contention. ``--jobs N`` runs N multiruns at a time.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from cl_runner.app import config_groups
from cl_runner.schema import md_table, pct_pm

ALIASES = {"finetune_sgd": ["method=finetune", "optimizer=sgd"]}
DEFAULT_METHODS = ["finetune", "finetune_sgd", "l2", "ewc", "online_ewc", "si", "mas", "joint"]


def parse_entry(entry: str) -> tuple[str, list[str]]:
    """A method entry → (label, overrides)."""
    if ":" in entry:
        label, _, rest = entry.partition(":")
        overrides = shlex.split(rest)
        if not label or not overrides or any("=" not in o for o in overrides):
            raise ValueError(f"method entry {entry!r}: expected LABEL:KEY=VALUE [KEY=VALUE …]")
        return label, overrides
    if "=" in entry or not entry:
        raise ValueError(f"method entry {entry!r}: give a method name or LABEL:KEY=VALUE …")
    return entry, list(ALIASES.get(entry, [f"method={entry}"]))


def memory_sizes(preset: str, overrides: list[str]) -> list[str] | None:
    """The memory sizes the preset offers best arguments for to this method entry (the keys of its
    protocol file's ``_best`` table), or None when the method takes none (it ignores ``buffer``)."""
    import hydra

    try:
        with hydra.initialize_config_module("cl_runner.configs", version_base="1.3"):
            cfg = hydra.compose("config", overrides=[f"experiment={preset}", *overrides])
    except Exception as e:  # an unknown method, a bad override: one line
        raise ValueError(f"{preset} {' '.join(overrides)}: {' '.join(str(e).split())}") from None
    best = cfg.method.get("_best")
    return None if best is None else [str(k) for k in best]


def expand(
    preset: str, label: str, overrides: list[str], buffers: list[int], extra: list[str]
) -> list[tuple[str, list[str]]]:
    """A method entry as rows: one per memory size in ``buffers`` for a method with a table of best
    arguments per size (``<label>@<size>``, ``buffer=<size>``); the entry itself otherwise, or when a
    ``buffer=`` is given in its overrides or after ``--``."""
    if any(o.split("=", 1)[0].lstrip("+") == "buffer" for o in [*overrides, *extra]):
        return [(label, overrides)]
    sizes = memory_sizes(preset, overrides)
    if sizes is None:
        return [(label, overrides)]
    if not buffers:
        raise ValueError(
            f"{preset} {label} takes its arguments per memory size: give --buffers (of {', '.join(sizes)})"
        )
    if bad := [str(b) for b in buffers if str(b) not in sizes]:
        raise ValueError(f"--buffers {' '.join(bad)}: {preset} {label} has best arguments for {', '.join(sizes)} only")
    return [(f"{label}@{b}", [*overrides, f"buffer={b}"]) for b in buffers]


def cl_run_command() -> list[str]:
    exe = shutil.which("cl-run") or str(Path(sys.executable).with_name("cl-run"))
    return [exe] if Path(exe).exists() else [sys.executable, "-m", "cl_runner.app"]


def run_one(
    preset: str,
    label: str,
    overrides: list[str],
    seeds: list[int],
    extra: list[str],
    sweep_dir: Path,
    env: dict[str, str],
    log_dir: Path,
) -> tuple[int, float]:
    cmd = [
        *cl_run_command(),
        "-m",
        f"experiment={preset}",
        *overrides,
        f"seed={','.join(map(str, seeds))}",
        f"hydra.sweep.dir={sweep_dir}",
        *extra,
    ]
    log = log_dir / f"{preset}__{label}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.perf_counter() - start


def summarize(preset: str, label: str, sweep_dir: Path) -> dict:
    """One entry's multirun, from its summary's rows (``cl_runner.report.summary``): the setting's
    ACC mean ± sample std over the ok seeds (fractions), counts, errors."""
    from cl_runner.report.summary import collect, group

    rows = collect(sweep_dir) if sweep_dir.exists() else []
    g = max(group(rows), key=lambda g: g["n_ok"], default={})  # one setting over the seeds
    ok = [r for r in rows if r.get("status") == "ok"]
    return {
        "preset": preset,
        "scenario": next((r["scenario"] for r in rows if r.get("scenario")), ""),
        "method": label,
        "n_ok": len(ok),
        "n_failed": len(rows) - len(ok),
        "acc_mean": g.get("acc_mean"),
        "acc_std": g.get("acc_std"),
        "seeds": " ".join(str(r.get("seed")) for r in ok),
        "wall_time_s_mean": g.get("wall_time_s_mean"),
        "errors": sorted({str(r.get("error")) for r in rows if r not in ok}),
    }


def cell(res: dict, n_seeds: int) -> str:
    if res["acc_mean"] is None:
        return "failed" if res["n_failed"] else "–"
    text = pct_pm(res["acc_mean"], res["acc_std"])
    return text if res["n_ok"] == n_seeds else f"{text} (n={res['n_ok']})"


def markdown(results: list[dict], presets: list[str], labels: list[str], n_seeds: int) -> str:
    """Rows = method entries, columns = presets (with their scenario)."""
    by = {(r["preset"], r["method"]): r for r in results}
    scenario = {r["preset"]: r["scenario"] for r in results if r["scenario"]}
    heads = [f"{p} ({scenario[p]}-IL)" if p in scenario else p for p in presets]
    rows = ([lab, *(cell(by[p, lab], n_seeds) if (p, lab) in by else "–" for p in presets)] for lab in labels)
    return md_table(["method", *heads], rows) + "\n"


def to_csv(results: list[dict]) -> str:
    fields = ["preset", "scenario", "method", "n_ok", "n_failed", "acc_mean", "acc_std", "seeds", "wall_time_s_mean"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    percent = {"acc_mean", "acc_std"}
    for r in results:
        row = {k: 100 * r[k] if k in percent and r[k] is not None else r[k] for k in fields}
        w.writerow({k: "" if v is None else round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("presets", nargs="+", help="experiment preset names (configs/experiment/*.yaml)")
    ap.add_argument(
        "--methods", nargs="+", default=DEFAULT_METHODS, help=f"method entries (default: {' '.join(DEFAULT_METHODS)})"
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument(
        "--buffers",
        nargs="+",
        type=int,
        default=[],
        help="memory sizes: one row per size for the methods a preset gives best arguments per size (der2020_*)",
    )
    ap.add_argument("--out", type=Path, default=None, help="output folder (default outputs/reproduce/<time>)")
    ap.add_argument("--jobs", type=int, default=1, help="multiruns at a time (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per run (OMP_NUM_THREADS; default 1)")
    ap.add_argument(
        "--resume", action="store_true", help="keep the entries of --out whose runs all finished; rerun the others"
    )
    ap.epilog = "Overrides for every run go after `--`, e.g. `-- data_dir=/work/shared/data download=false`."
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse would hand the words after `--` to the presets: split them off first
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    known = config_groups()["experiment"]
    try:
        entries = [parse_entry(e) for e in args.methods]
        labels = [lab for lab, _ in entries]
        if unknown := [p for p in args.presets if p not in known]:
            raise ValueError(f"unknown preset {', '.join(unknown)}; choose from: {', '.join(known)}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"--methods has repeated labels: {' '.join(labels)}")
        if args.jobs < 1 or args.threads < 1:
            raise ValueError("--jobs and --threads must be at least 1")
        rows = {
            p: [row for lab, ov in entries for row in expand(p, lab, ov, args.buffers, args.extra)]
            for p in args.presets
        }
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or Path("outputs/reproduce") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = out.resolve()
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    labels = list(dict.fromkeys(lab for p in args.presets for lab, _ in rows[p]))
    todo = []
    for p in args.presets:
        for lab, ov in rows[p]:
            sweep_dir = out / p / lab
            if sweep_dir.exists():
                res = summarize(p, lab, sweep_dir)
                if args.resume and res["n_ok"] == len(args.seeds):
                    continue
                if args.resume:
                    shutil.rmtree(sweep_dir)  # partial: run the whole entry again
                else:
                    print(f"error: {sweep_dir} exists; use another --out or --resume", file=sys.stderr)
                    return 2
            todo.append((p, lab, ov, sweep_dir))

    total = len(todo)
    start = time.perf_counter()

    def job(item):
        p, lab, ov, sweep_dir = item
        rc, secs = run_one(p, lab, ov, args.seeds, args.extra, sweep_dir, env, log_dir)
        res = summarize(p, lab, sweep_dir)
        print(
            f"[{time.perf_counter() - start:7.0f}s] {p} {lab}: {cell(res, len(args.seeds))} ({secs:.0f}s, rc={rc})",
            file=sys.stderr,
            flush=True,
        )
        return rc

    print(f"{total} multiruns × {len(args.seeds)} seeds into {out} (logs in {log_dir})", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        codes = list(pool.map(job, todo))
    wall = time.perf_counter() - start

    results = [summarize(p, lab, out / p / lab) for p in args.presets for lab, _ in rows[p]]
    md = markdown(results, args.presets, labels, len(args.seeds))
    failures = [
        f"- {r['preset']} {r['method']}: {r['n_failed']} failed: {'; '.join(r['errors'])}"
        for r in results
        if r["n_failed"] or r["n_ok"] < len(args.seeds)
    ]
    note = (
        f"\nACC (%) after the last task, mean ± sample std over seeds {' '.join(map(str, args.seeds))}; "
        f"{total} multiruns in {wall:.0f} s wall time; extra overrides: {' '.join(args.extra) or 'none'}.\n"
    )
    text = md + note + ("\nIncomplete:\n" + "\n".join(failures) + "\n" if failures else "")
    (out / "results.md").write_text(text)
    (out / "results.csv").write_text(to_csv(results))
    print(text)
    print(to_csv(results))
    bad = any(codes) or bool(failures)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
