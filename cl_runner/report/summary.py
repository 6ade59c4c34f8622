"""Sweep summaries (README, "Sweeps: look at your sweep"): summary.csv, summary.md, summary_grouped.csv,
tradeoff.png and the TensorBoard run ``summary``, and the same tables in the terminal.

The rows come from the job folders (:mod:`cl_runner.report.rows`), never from the launcher's return
values, so the summary is the same under every launcher and ``cl-run-summary`` rebuilds it for a
finished, partial or interrupted sweep. A sweep folder may come from elsewhere: its texts are printed
without rich markup.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from cl_runner.report.rows import (  # noqa: F401  (the rows' API, also as this module's)
    GROUP_FIELDS,
    add_intransigence,
    collect,
    group,
    has_repeats,
    job_dirs,
    mean_std,
    metrics_shown,
    options_text,
    sweep_status,
    swept_keys,
    swept_value,
)
from cl_runner.runfiles import write_atomic
from cl_runner.schema import IDENTITY, SETTINGS, STATUSES, TITLES, md_table, pct, pct_pm, plain, printable

_WHY = {
    "missing": "no metrics.json (never started, killed, or still running)",
    "interrupted": "interrupted; run the same command again to resume",
    "cancelled": "cancelled",
    "timeout": "stopped by the scheduler's time limit; run the same command again to resume",
}


def _secs(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _varying(rows: list[dict[str, Any]], key: str) -> bool:
    return len({plain(r.get(key)) for r in rows}) > 1


def _setting_columns(items: list[dict[str, Any]], keys: list[str]) -> list[tuple[str, Any]]:
    """(title, item → cell text): method, λ, benchmark, scenario, the :data:`SETTINGS` that vary, the swept keys."""
    fields = [("method", "method"), ("λ", "lambda"), ("benchmark", "benchmark"), ("scenario", "scenario")]
    fields += [(k, k) for k in SETTINGS if _varying(items, k)]
    cols = [(title, lambda r, k=k: plain(r.get(k))) for title, k in fields]
    return cols + [(key, lambda r, k=key: swept_value(r, k)) for key in keys]


def _job_columns(rows: list[dict[str, Any]], with_job: bool = True) -> list[tuple[str, Any]]:
    """The per-job tables: the setting, seed, the metrics (intransigence only when some job has it),
    time and status; the job folder name only in the markdown (the terminal is narrow)."""
    cols = [("#", lambda r: plain(r.get("num")))] + ([("job", lambda r: r["job"])] if with_job else [])
    cols += _setting_columns(rows, swept_keys(rows)) + [("seed", lambda r: plain(r.get("seed")))]
    cols += [(f"{TITLES[m]} %", lambda r, k=m: pct(r.get(k))) for m in metrics_shown(rows)]
    return cols + [("time s", lambda r: _secs(r.get("wall_time_s"))), ("status", lambda r: r.get("status", ""))]


def _group_columns(groups: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    keys = [k for k in swept_keys(rows) if k != "seed"]
    cols = _setting_columns(groups, keys)
    by_method: dict[Any, set[str]] = {}
    for g in groups:
        by_method.setdefault(g.get("method"), set()).add(options_text(g.get("method_options")))
    # one method run with different options that no swept column explains (e.g. a preset's)
    if any(len(v) > 1 for v in by_method.values()) and not any(k.startswith("method.") for k in keys):
        cols.append(("options", lambda g: options_text(g.get("method_options"))))
    cols.append(("ok / jobs", lambda g: f"{g['n_ok']} / {g['n_jobs']}"))
    for m in metrics_shown(rows):
        cols.append((f"{TITLES[m]} %", lambda g, k=m: pct_pm(g[f"{k}_mean"], g[f"{k}_std"])))
    cols.append(("time s", lambda g: _secs(g["wall_time_s_mean"])))
    return cols


def _md_table(cols: list[tuple[str, Any]], items: list[dict[str, Any]]) -> str:
    return md_table([t for t, _ in cols], ([f(it) for _, f in cols] for it in items))


def _counts(rows: list[dict[str, Any]]) -> str:
    """``8 jobs: 5 ok, 1 failed, 1 diverged, 1 missing``: ok and failed always, others when present."""
    n = {s: sum(1 for r in rows if r.get("status") == s) for s in STATUSES}
    parts = [f"{n['ok']} ok", f"{n['failed']} failed"] + [f"{n[s]} {s}" for s in STATUSES[2:] if n[s]]
    return f"{len(rows)} jobs: " + ", ".join(parts)


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    """Why some metrics are blank, from metrics.json's ``metric_notes`` (dict metric → reason, or text)."""
    seen: dict[str, list[str]] = {}
    for r in rows:
        notes = r.get("metric_notes") or {}
        for metric, reason in notes.items() if isinstance(notes, dict) else [("", notes)]:
            text = f"{metric}: {reason}" if metric else str(reason)
            seen.setdefault(" ".join(text.split()), []).append(r["job"])
    return [
        f"- {text} ({len(jobs)} job{'s' if len(jobs) > 1 else ''}: {', '.join(f'`{j}`' for j in jobs[:3])}"
        f"{', …' if len(jobs) > 3 else ''})"
        for text, jobs in seen.items()
    ]


# ----------------------------------------------------------------------------- write / print
def _csv(fields: list[str], items: list[dict[str, Any]], keys: list[str], percent: dict[str, str]) -> str:
    """CSV of ``items``: swept ``keys`` from their overrides, ``percent`` columns (name → field) × 100,
    dicts and lists as JSON, None as an empty cell."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fields)
    for it in items:
        values = {**it, **{k: swept_value(it, k) for k in keys}}
        values |= {col: None if it.get(f) is None else 100.0 * it[f] for col, f in percent.items()}
        cells = [values.get(f) for f in fields]
        w.writerow(
            [
                ""
                if v is None
                else json.dumps(v, sort_keys=True, default=str)
                if isinstance(v, (dict, list, tuple))
                else v
                for v in cells
            ]
        )
    return buf.getvalue()


def _job_csv(rows: list[dict[str, Any]]) -> str:
    """summary.csv: metrics as ``<metric>_pct`` (percent, full precision)."""
    keys, pcts = swept_keys(rows), {f"{m}_pct": m for m in metrics_shown(rows)}
    fields = ["num", "job", "status", *IDENTITY, *keys, *pcts, "wall_time_s", "method_options", "overrides", "error"]
    return _csv(fields, rows, keys, pcts)


def _grouped_csv(groups: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    keys = [k for k in swept_keys(rows) if k != "seed"]
    pcts = {f"{m}_pct_{s}": f"{m}_{s}" for m in metrics_shown(rows) for s in ("mean", "std")}
    fields = [*GROUP_FIELDS, *keys, "n_jobs", "n_ok", "seeds", *pcts, "wall_time_s_mean", "wall_time_s_std"]
    return _csv(fields, groups, keys, pcts)


def write_summary(sweep_dir: str | Path, rows: list[dict[str, Any]], figure: bool = True) -> tuple[Path, Path]:
    """Write summary.csv and summary.md (and summary_grouped.csv when some setting has several
    seeds; tradeoff.png and its TensorBoard copy when λ varies) into ``sweep_dir``; returns
    (csv_path, md_path)."""
    sweep_dir = Path(sweep_dir)
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    write_atomic(csv_path, _job_csv(rows))

    metrics_text = "ACC, BWT, FWT, forgetting, LA = learning accuracy"
    if "intransigence" in metrics_shown(rows):
        metrics_text += ", intransigence against the joint (cumulative) job of the same seed and settings"
    md = [f"# Sweep summary: {sweep_dir.name}", "", f"{_counts(rows)}. Metrics in % ({metrics_text}).", ""]
    md.append(_md_table(_job_columns(rows), rows))
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        md += ["", "## Jobs without (complete) results", ""]
        for r in failed:
            reason = r.get("error") or _WHY.get(r["status"], "unknown error")
            md.append(f"- `{r['job']}` ({r['status']}): {reason}")
    notes = _notes(rows)
    if notes:
        md += ["", "## Blank metrics", ""] + notes
    grouped_path = sweep_dir / "summary_grouped.csv"
    if has_repeats(rows):
        groups = group(rows)
        md += [
            "",
            "## Mean ± std over seeds",
            "",
            "Over the jobs with status ok; std = sample standard deviation (n − 1).",
        ]
        md += ["", _md_table(_group_columns(groups, rows), groups)]
        write_atomic(grouped_path, _grouped_csv(groups, rows))
    elif grouped_path.exists():  # a rebuilt summary must not keep a stale grouped table
        grouped_path.unlink()
    png = sweep_dir / "tradeoff.png"
    made = False
    if figure:
        try:
            fig = _tradeoff(rows)
            if fig is not None:
                tmp = png.with_name("tradeoff.tmp.png")
                fig.savefig(tmp)
                tmp.replace(png)
                made = True
                md += ["", "## Trade-off", "", "![ACC, BWT and learning accuracy against λ](tradeoff.png)"]
                _write_tensorboard(sweep_dir, _tradeoff(rows, vertical=True), "\n".join(md))
        except Exception as e:  # noqa: BLE001 - the tables matter more than the figure
            print(f"summary: no trade-off figure: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
    if not made and png.exists():
        png.unlink()
    write_atomic(md_path, "\n".join(md) + "\n")
    return csv_path, md_path


def tradeoff_data(rows: list[dict[str, Any]]) -> tuple[dict, dict, int] | None:
    """The points of the trade-off figure, from the ok jobs: ``series`` (label → [(λ, {metric:
    (mean, std)})], sorted by λ) for jobs with a λ, ``references`` (label → {metric: (mean, std)})
    for methods without one (finetune, joint), and the largest number of seeds behind a point.
    A label is the method plus every other swept setting (benchmark, ``method.fisher_labels=all``…).
    None when no series has two λ values. Values in percent; std is the sample std (0 for one seed)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    keys = swept_keys(rows)
    extras = [e for e in ("benchmark", "scenario", *SETTINGS) if _varying(ok, e)]

    def label(r: dict[str, Any]) -> str:
        swept = [f"{k}={swept_value(r, k)}" for k in keys if swept_value(r, k)]
        return " ".join([str(r.get("method"))] + [str(r.get(e)) for e in extras] + swept)

    def stats(members: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
        pairs = {m: mean_std(members, m, 100.0) for m in ("acc", "bwt", "learning_accuracy")}
        return {m: (mean, std or 0.0) for m, (mean, std) in pairs.items() if mean is not None}

    by_lambda: dict[str, dict[float, list]] = {}
    refs: dict[str, list] = {}
    for r in ok:
        if r.get("lambda") is None:
            refs.setdefault(label(r), []).append(r)
        else:
            by_lambda.setdefault(label(r), {}).setdefault(float(r["lambda"]), []).append(r)
    if not any(len(points) > 1 for points in by_lambda.values()):
        return None
    series = {lab: [(lam, stats(ms)) for lam, ms in sorted(points.items())] for lab, points in by_lambda.items()}
    n = max([len(ms) for points in by_lambda.values() for ms in points.values()] + [len(ms) for ms in refs.values()])
    return series, {lab: stats(ms) for lab, ms in refs.items()}, n


def _tradeoff(rows: list[dict[str, Any]], vertical: bool = False):
    data = tradeoff_data(rows)
    if data is None:
        return None
    from cl_runner.report.tb import tradeoff_figure  # matplotlib: only when there is something to draw

    ok = [r for r in rows if r.get("status") == "ok"]
    where = ", ".join(
        f"{plain(ok[0].get(k))}{'-IL' if k == 'scenario' else ''}"
        for k in ("benchmark", "scenario")
        if not _varying(ok, k)
    )
    return tradeoff_figure(*data, where=where, vertical=vertical)


def _write_tensorboard(sweep_dir: Path, fig, markdown: str) -> None:
    """The trade-off figure (image ``sweep/tradeoff``, its panels stacked to stay legible at card
    size) and summary.md (text ``sweep/summary``) in the TensorBoard run ``summary`` of the sweep
    folder; a rebuilt summary replaces the old events."""
    from torch.utils.tensorboard import SummaryWriter

    from cl_runner.report.tb import figure_to_array

    tb_dir = sweep_dir / "summary"
    if tb_dir.is_dir():
        for old in tb_dir.glob("events.out.tfevents.*"):
            old.unlink()
    with SummaryWriter(str(tb_dir)) as w:
        w.add_image("sweep/tradeoff", figure_to_array(fig), 0, dataformats="HWC")
        w.add_text("sweep/summary", markdown, 0)


def print_summary(rows: list[dict[str, Any]], console=None, title: str = "Sweep summary") -> None:
    """The per-job table (and the mean ± std table when some setting has several seeds) with rich.
    Every cell, header and error line is a ``rich.text.Text`` of :func:`printable` text: errors,
    overrides, job and folder names come from files and are printed as they are, never read as rich
    markup (``[/red]`` in an error text raised, and a sweep lost its exit status) or as terminal
    control sequences."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if console is None:
        console = Console(markup=False, highlight=False)
        if not console.is_terminal:  # pipes and logs: rich would squeeze the tables into 80 columns
            console = Console(width=160, markup=False, highlight=False)
    style = {"ok": "green", "failed": "bold red", "diverged": "bold red"}  # other statuses: yellow

    def table(title: str, cols: list[tuple[str, Any]], items: list[dict[str, Any]]) -> Table:
        t = Table(title=Text(printable(title)))
        for name, _ in cols:
            right = name.endswith("%") or name in ("#", "seed", "λ", "time s", "ok / jobs")
            t.add_column(Text(printable(name)), justify="right" if right else "left")
        for it in items:
            t.add_row(*[c if isinstance(c, Text) else Text(printable(c)) for c in (f(it) for _, f in cols)])
        return t

    def status_cell(r: dict[str, Any]) -> Text:
        return Text(printable(r.get("status", "")), style=style.get(r.get("status"), "yellow"))

    cols = _job_columns(rows, with_job=False)
    console.print(table(f"{title}: {_counts(rows)}", [*cols[:-1], ("status", status_cell)], rows))
    for r in rows:
        if r.get("status") != "ok" and r.get("error"):
            console.print(Text.assemble((printable(r["job"]), "red"), ": ", printable(r["error"])), highlight=False)
    if has_repeats(rows):
        groups = group(rows)
        console.print(table("Mean ± std over seeds (ok jobs; sample std)", _group_columns(groups, rows), groups))


def summarize(
    sweep_dir: str | Path, console=None, quiet: bool = False, joint_dirs: Iterable[str | Path] = (), figure: bool = True
) -> list[dict[str, Any]]:
    """collect → write_summary → print_summary; the last lines printed name the summary's path."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir, joint_dirs)
    report(sweep_dir, rows, console, quiet, figure)
    return rows


def report(sweep_dir: Path, rows: list[dict[str, Any]], console=None, quiet: bool = False, figure: bool = True) -> None:
    """write_summary, then (unless ``quiet``) print_summary and the summary's path."""
    _, md_path = write_summary(sweep_dir, rows, figure=figure)
    if not quiet:
        print_summary(rows, console)
        also = ["summary.csv"] + [p for p in ("summary_grouped.csv", "tradeoff.png") if (sweep_dir / p).exists()]
        print(f"summary: {md_path.resolve()} (also {', '.join(also)})")
        print(f"  tensorboard --logdir {sweep_dir.resolve()}")


class SummaryCallback(Callback):
    """Hydra callback: at the end of a multirun, summarize ``hydra.sweep.dir`` from the files on
    disk (works for any launcher). Never raises: a broken summary must not hide the results. The
    rows are kept in ``self.rows`` as soon as they are collected, before anything is written or
    printed. (cl-run's exit code for a multirun is :func:`sweep_status` of the job folders, read by
    ``cl_runner.app.main`` once the sweep has ended: a summary that cannot be written or printed never
    changes it.)"""

    rows: list[dict[str, Any]] | None = None

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        self.rows = None
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            if not sweep_dir.is_dir():
                print(f"summary: sweep directory {sweep_dir} does not exist; nothing to summarize", file=sys.stderr)
                return
            self.rows = collect(sweep_dir)
            report(sweep_dir, self.rows)
        except Exception as e:  # noqa: BLE001 - report in one line and let Hydra finish normally
            print(f"summary: could not summarize the sweep: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def is_sweep_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "multirun.yaml").is_file() or bool(job_dirs(path)))


def main(argv: list[str] | None = None) -> int:
    """``cl-run-summary SWEEP_DIR [--joint DIR] [--quiet]``: rebuild and print the summary of a
    finished, partial or interrupted sweep (also one from elsewhere: its files are read, never
    evaluated, and its texts printed as they are). Exit code 0 when every job is ok, 1 otherwise (or
    when the summary cannot be written), 2 when SWEEP_DIR is not a sweep folder."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="cl-run-summary",
        description="Rebuild summary.csv / summary.md / tradeoff.png of a cl-run sweep directory from its jobs' "
        "metrics.json and its multirun.yaml. Exit code: 0 all jobs ok, 1 some job not ok, 2 not a sweep folder.",
    )
    parser.add_argument("sweep_dir", help="a sweep directory (outputs/sweeps/<stamp>)")
    parser.add_argument(
        "--joint",
        action="append",
        default=[],
        metavar="DIR",
        help="another sweep folder whose method=joint (cumulative) jobs are the intransigence "
        "references (the sweep's own joint jobs are used in any case)",
    )
    parser.add_argument("--quiet", action="store_true", help="write the files without printing the tables")
    args = parser.parse_args(argv)
    for key, path in [("sweep_dir", Path(args.sweep_dir))] + [("--joint", Path(d)) for d in args.joint]:
        no = "a directory" if not path.is_dir() else None if is_sweep_dir(path) else "a sweep folder"
        if no:
            detail = " (no multirun.yaml and no job folders with .hydra/ or metrics.json)" if path.is_dir() else ""
            print(f"error: {key} {path} is not {no}{detail}", file=sys.stderr)
            return 2
    try:
        rows = collect(args.sweep_dir, args.joint)
        report(Path(args.sweep_dir), rows, quiet=args.quiet)
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        print(f"error: could not summarize {args.sweep_dir}: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1
    return sweep_status(rows)


if __name__ == "__main__":
    sys.exit(main())
