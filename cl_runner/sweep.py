"""Sweep summaries: collect the jobs' ``metrics.json`` from disk, write summary.csv / summary.md,
print them as rich tables.

Everything is read back from the job folders, never from the launcher's return values, so the
summary is the same under the basic, joblib and submitit launchers, and ``scripts/summarize.py``
can rebuild it for a finished or partial sweep.

Files written into the sweep directory:

- ``summary.csv``: one row per job folder (raw fractions, full precision; empty cell = none).
- ``summary.md``: the same as a markdown table (metrics in %), the errors of failed jobs, and,
  when some setting was run with more than one seed, a grouped table of mean ± std.
- ``summary_grouped.csv``: the grouped table, only when some setting has more than one seed.

Grouping: a setting is every identifying value of a job except its seed: method, λ, benchmark,
scenario, model, optimizer, experiment, the method's options, and any other command-line override
(e.g. ``epochs=5``). Means and standard deviations are taken over the jobs with status "ok" only;
std is the sample standard deviation (divisor n − 1), empty when only one job is ok.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable

from hydra.experimental.callback import Callback

from cl_runner.identity import run_identity

METRICS = ("acc", "bwt", "fwt", "forgetting", "learning_accuracy")
METRIC_TITLES = {"acc": "ACC", "bwt": "BWT", "fwt": "FWT", "forgetting": "forgetting", "learning_accuracy": "LA"}
IDENTITY = ("method", "lambda", "benchmark", "scenario", "seed", "model", "optimizer", "experiment")
CSV_FIELDS = (
    "num", "job", "status", *IDENTITY, *METRICS, "wall_time_s", "method_options", "overrides", "error",
)
GROUP_FIELDS = ("method", "lambda", "benchmark", "scenario", "model", "optimizer", "experiment", "method_options", "other")
# Overrides already represented by an identifying field (or irrelevant to the result) are left out
# of the "other" part of a setting.
_COVERED = set(IDENTITY) | {"data_dir", "device", "download"}


# ----------------------------------------------------------------------------- collect
def _job_dirs(sweep_dir: Path) -> list[Path]:
    found = {p.parent for p in sweep_dir.rglob("metrics.json")}
    found |= {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()}
    # submitit keeps its pickles and logs under .submitit/: never job folders
    found = {d for d in found if ".submitit" not in d.relative_to(sweep_dir).parts}
    return sorted(found, key=lambda d: (_job_num(d.name), str(d.relative_to(sweep_dir))))


def _job_num(name: str) -> float:
    m = re.match(r"(\d+)_|(\d+)$", name)
    return float(m.group(1) or m.group(2)) if m else math.inf


def _read_overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    if path.is_file():
        try:
            from omegaconf import OmegaConf

            return [str(o) for o in OmegaConf.to_container(OmegaConf.load(path)) or []]
        except Exception:
            pass
    # no .hydra: the folder name is "<num>_<override_dirname>" (a best effort: values with commas split)
    m = re.match(r"\d+_(.*)$", job.name)
    return [o for o in m.group(1).split(",") if "=" in o] if m else []


def _identity_from_config(job: Path, overrides: list[str]) -> dict[str, Any]:
    """Identifying fields of a job without metrics.json: .hydra/config.yaml, else the overrides."""
    ident: dict[str, Any] = {}
    path = job / ".hydra" / "config.yaml"
    if path.is_file():
        try:
            from omegaconf import OmegaConf

            ident = run_identity(OmegaConf.load(path))
        except Exception:
            pass
    for o in overrides:  # fill what config.yaml did not give
        key, _, value = o.lstrip("+~").partition("=")
        if key in IDENTITY and ident.get(key) is None:
            ident[key] = _parse_scalar(value)
    return ident


def _parse_scalar(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return None if text == "null" else text


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job folder below ``sweep_dir`` (a folder holding ``.hydra/`` or ``metrics.json``).

    Fields: num (job number from the folder name), job (folder path relative to the sweep dir),
    status ("ok" | "failed" from metrics.json; "missing" when a job folder has no metrics.json:
    crashed, killed or still running), the identifying fields, the five metrics (fractions),
    wall_time_s, method_options (dict), overrides (list of str), error (str or None). A job folder
    with no or unreadable metrics.json takes its identifying fields from ``.hydra/config.yaml``,
    else from its overrides.
    """
    sweep_dir = Path(sweep_dir)
    rows = []
    for job in _job_dirs(sweep_dir):
        overrides = _read_overrides(job)
        rel = str(job.relative_to(sweep_dir))
        num = _job_num(job.name)
        row: dict[str, Any] = {"num": int(num) if num != math.inf else None, "job": rel, "overrides": overrides}
        data = None
        metrics_path = job / "metrics.json"
        if metrics_path.is_file():
            try:
                data = json.loads(metrics_path.read_text())
            except (OSError, ValueError) as e:
                row["error"] = f"unreadable metrics.json: {e}"
        if isinstance(data, dict):
            status = data.get("status")
            row["status"] = status if status in ("ok", "failed") else "failed"
            row["error"] = data.get("error")
            for k in IDENTITY:
                row[k] = data.get(k)
            row["method_options"] = data.get("method_options") or {}
            for k in (*METRICS, "wall_time_s"):
                row[k] = _number(data.get(k))
        else:
            row["status"] = "failed" if metrics_path.is_file() else "missing"
            row.setdefault("error", None if row["status"] == "missing" else "unreadable metrics.json")
            ident = _identity_from_config(job, overrides)
            for k in IDENTITY:
                row[k] = ident.get(k)
            row["method_options"] = ident.get("method_options") or {}
            for k in (*METRICS, "wall_time_s"):
                row[k] = None
        rows.append(row)
    return rows


def _number(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- grouping
def _other_overrides(row: dict[str, Any]) -> str:
    out = []
    for o in row.get("overrides") or []:
        key = o.lstrip("+~").partition("=")[0]
        if key in _COVERED or key.startswith("method.") or key.startswith("hydra.") or key == "hydra":
            continue
        out.append(o)
    return ",".join(sorted(out))


def _options_text(options: Any) -> str:
    return json.dumps(options or {}, sort_keys=True, default=str)


def _group_key(row: dict[str, Any]) -> tuple:
    return (
        row.get("method"), _fmt_plain(row.get("lambda")), row.get("benchmark"), row.get("scenario"),
        row.get("model"), row.get("optimizer"), row.get("experiment"),
        _options_text(row.get("method_options")), _other_overrides(row),
    )


def group(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one setting (all identifying values but the seed) merged: n_ok, n_jobs, seeds, and
    ``<metric>_mean`` / ``<metric>_std`` over the ok jobs (sample std, None when n_ok < 2)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    out = []
    for key, members in groups.items():
        ok = [r for r in members if r.get("status") == "ok"]
        g: dict[str, Any] = dict(zip(GROUP_FIELDS, key))
        g["lambda"] = members[0].get("lambda")
        g["method_options"] = members[0].get("method_options") or {}
        g["n_jobs"] = len(members)
        g["n_ok"] = len(ok)
        g["seeds"] = sorted({r.get("seed") for r in members if r.get("seed") is not None}, key=str)
        for m in (*METRICS, "wall_time_s"):
            vals = [r[m] for r in ok if r.get(m) is not None and not math.isnan(r[m])]
            g[f"{m}_mean"] = statistics.fmean(vals) if vals else None
            g[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(g)
    return out


def has_repeats(rows: Iterable[dict[str, Any]]) -> bool:
    """True when some setting was run with more than one seed."""
    return any(len(g["seeds"]) > 1 or g["n_jobs"] > 1 for g in group(rows))


# ----------------------------------------------------------------------------- formatting
def _fmt_plain(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _pct(v: float | None) -> str:
    return "" if v is None or math.isnan(v) else f"{100 * v:.2f}"


def _pct_pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def _secs(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _varying(rows: list[dict[str, Any]], key: str) -> bool:
    return len({_fmt_plain(r.get(key)) for r in rows}) > 1


def _job_columns(rows: list[dict[str, Any]], with_job: bool = True) -> list[tuple[str, Any]]:
    """(title, row → cell text) for the per-job tables; model/optimizer/experiment and the other
    overrides only when they vary; the job folder name only in the markdown (the terminal is narrow)."""
    cols: list[tuple[str, Any]] = [("#", lambda r: _fmt_plain(r.get("num")))]
    if with_job:
        cols.append(("job", lambda r: r["job"]))
    cols += [
        ("method", lambda r: _fmt_plain(r.get("method"))),
        ("λ", lambda r: _fmt_plain(r.get("lambda"))),
        ("benchmark", lambda r: _fmt_plain(r.get("benchmark"))),
        ("scenario", lambda r: _fmt_plain(r.get("scenario"))),
    ]
    for extra in ("model", "optimizer", "experiment"):
        if _varying(rows, extra):
            cols.append((extra, lambda r, k=extra: _fmt_plain(r.get(k))))
    if not with_job and len({_other_overrides(r) for r in rows}) > 1:
        cols.append(("other", _other_overrides))
    cols.append(("seed", lambda r: _fmt_plain(r.get("seed"))))
    for m in METRICS:
        cols.append((f"{METRIC_TITLES[m]} %", lambda r, k=m: _pct(r.get(k))))
    cols += [("time s", lambda r: _secs(r.get("wall_time_s"))), ("status", lambda r: r.get("status", ""))]
    return cols


def _group_columns(groups: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    cols: list[tuple[str, Any]] = [
        ("method", lambda g: _fmt_plain(g.get("method"))),
        ("λ", lambda g: _fmt_plain(g.get("lambda"))),
        ("benchmark", lambda g: _fmt_plain(g.get("benchmark"))),
        ("scenario", lambda g: _fmt_plain(g.get("scenario"))),
    ]
    for extra in ("model", "optimizer", "experiment", "other"):
        if _varying(groups, extra):
            cols.append((extra, lambda g, k=extra: _fmt_plain(g.get(k))))
    by_method: dict[Any, set[str]] = {}
    for g in groups:
        by_method.setdefault(g.get("method"), set()).add(_options_text(g.get("method_options")))
    if any(len(v) > 1 for v in by_method.values()):  # only when one method was run with different options
        cols.append(("options", lambda g: _options_text(g.get("method_options"))))
    cols.append(("ok / jobs", lambda g: f"{g['n_ok']} / {g['n_jobs']}"))
    for m in METRICS:
        cols.append((f"{METRIC_TITLES[m]} %", lambda g, k=m: _pct_pm(g[f"{k}_mean"], g[f"{k}_std"])))
    cols.append(("time s", lambda g: _secs(g["wall_time_s_mean"])))
    return cols


def _md_table(cols: list[tuple[str, Any]], items: list[dict[str, Any]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(t for t, _ in cols) + " |", "|" + "---|" * len(cols)]
    for it in items:
        lines.append("| " + " | ".join(cell(f(it)) for _, f in cols) + " |")
    return "\n".join(lines)


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return v


def _counts(rows: list[dict[str, Any]]) -> str:
    n = {s: sum(1 for r in rows if r.get("status") == s) for s in ("ok", "failed", "missing")}
    text = f"{len(rows)} jobs: {n['ok']} ok, {n['failed']} failed"
    return text + (f", {n['missing']} missing (no metrics.json: crashed or still running)" if n["missing"] else "")


# ----------------------------------------------------------------------------- write / print
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _csv_text(fields: Iterable[str], items: list[dict[str, Any]]) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    fields = list(fields)
    w.writerow(fields)
    for it in items:
        w.writerow([_csv_value(it.get(f)) for f in fields])
    return buf.getvalue()


def write_summary(sweep_dir: str | Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Write summary.csv and summary.md (and summary_grouped.csv when some setting has several
    seeds) into ``sweep_dir``; returns (csv_path, md_path)."""
    sweep_dir = Path(sweep_dir)
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    _write_atomic(csv_path, _csv_text(CSV_FIELDS, rows))

    md = [f"# Sweep summary: {sweep_dir.name}", "", _counts(rows) + ". Metrics in % (ACC, BWT, FWT, forgetting, LA = learning accuracy).", ""]
    md.append(_md_table(_job_columns(rows), rows))
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        md += ["", "## Jobs without results", ""]
        for r in failed:
            reason = r.get("error") or ("no metrics.json (crashed or still running)" if r["status"] == "missing" else "unknown error")
            md.append(f"- `{r['job']}` ({r['status']}): {reason}")
    grouped_path = sweep_dir / "summary_grouped.csv"
    if has_repeats(rows):
        groups = group(rows)
        md += [
            "", "## Mean ± std over seeds", "",
            "Over the jobs with status ok; std = sample standard deviation (n − 1).", "",
            _md_table(_group_columns(groups), groups),
        ]
        fields = [*GROUP_FIELDS, "n_jobs", "n_ok", "seeds"] + [f"{m}_{s}" for m in (*METRICS, "wall_time_s") for s in ("mean", "std")]
        _write_atomic(grouped_path, _csv_text(fields, groups))
    elif grouped_path.exists():  # a rebuilt summary must not keep a stale grouped table
        grouped_path.unlink()
    _write_atomic(md_path, "\n".join(md) + "\n")
    return csv_path, md_path


def print_summary(rows: list[dict[str, Any]], console=None, title: str = "Sweep summary") -> None:
    """The per-job table (and the mean ± std table when some setting has several seeds) with rich."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # pipes and logs: rich would squeeze the tables into 80 columns
            console = Console(width=160)
    style = {"ok": "green", "failed": "bold red", "missing": "yellow"}
    table = Table(title=f"{title}: {_counts(rows)}")
    cols = _job_columns(rows, with_job=False)
    for t, _ in cols:
        table.add_column(t, justify="right" if t.endswith("%") or t in ("#", "seed", "λ", "time s") else "left")
    for r in rows:
        cells = [f(r) for _, f in cols]
        cells[-1] = f"[{style.get(r.get('status'), 'red')}]{cells[-1]}[/]"
        table.add_row(*cells)
    console.print(table)
    for r in rows:
        if r.get("status") != "ok" and r.get("error"):
            console.print(f"[red]{r['job']}[/]: {r['error']}", markup=True, highlight=False)
    if has_repeats(rows):
        groups = group(rows)
        gt = Table(title="Mean ± std over seeds (ok jobs; sample std)")
        gcols = _group_columns(groups)
        for t, _ in gcols:
            gt.add_column(t, justify="right" if t.endswith("%") or t in ("λ", "time s", "ok / jobs") else "left")
        for g in groups:
            gt.add_row(*[f(g) for _, f in gcols])
        console.print(gt)


def summarize(sweep_dir: str | Path, console=None, quiet: bool = False) -> list[dict[str, Any]]:
    """collect → write_summary → print_summary; returns the rows."""
    rows = collect(sweep_dir)
    csv_path, md_path = write_summary(sweep_dir, rows)
    if not quiet:
        print_summary(rows, console)
        print(f"summary: {csv_path} and {md_path.name}")
    return rows


#: 0 when every job of the last multirun summarized in this process ended ok, else 1 (cl-run's exit code)
LAST_STATUS = 0


class SummaryCallback(Callback):
    """Hydra callback: at the end of a multirun, summarize ``hydra.sweep.dir`` from the files on
    disk (works for any launcher). Never raises: a broken summary must not hide the results."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            if not sweep_dir.is_dir():
                print(f"summary: sweep directory {sweep_dir} does not exist; nothing to summarize", file=sys.stderr)
                return
            rows = summarize(sweep_dir)
            global LAST_STATUS
            LAST_STATUS = 0 if all(r["status"] == "ok" for r in rows) else 1
        except Exception as e:  # noqa: BLE001 - report in one line and let Hydra finish normally
            print(f"summary: could not summarize the sweep: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``scripts/summarize.py SWEEP_DIR [--quiet]``: rebuild the summary of a finished or partial sweep."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="summarize.py",
        description="Rebuild summary.csv / summary.md of a cl-run sweep directory from its jobs' metrics.json.",
    )
    parser.add_argument("sweep_dir", help="a sweep directory (outputs/sweeps/<stamp>)")
    parser.add_argument("--quiet", action="store_true", help="write the files without printing the tables")
    args = parser.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        print(f"error: sweep_dir {sweep_dir} is not a directory", file=sys.stderr)
        return 2
    if not _job_dirs(sweep_dir):
        print(f"error: no job folders (with .hydra/ or metrics.json) below {sweep_dir}", file=sys.stderr)
        return 2
    summarize(sweep_dir, quiet=args.quiet)
    return 0
