"""A sweep's rows, read back from its job folders (README, "Sweeps: look at your sweep"): one row per
job (:func:`collect`), the settings merged over seeds (:func:`group`), intransigence against the joint
jobs, the keys the sweep varies, and the sweep's exit status. The summary's files and tables are
:mod:`cl_runner.report.summary`.

Everything is read from the job folders and the sweep's ``multirun.yaml``, never from the launcher's
return values, so the rows are the same under every launcher. ``missing`` = a job with no
metrics.json, including jobs of ``multirun.yaml`` that have no folder at all. Saved configs are read
with :func:`cl_runner.identity.read_saved`: nothing in a folder from elsewhere is resolved or run.

Grouping: a setting is every identifying value of a job (:data:`cl_runner.schema.IDENTITY`) except
its seed, plus the method's options and any other command-line override (e.g. ``epochs=5``). Means
and sample standard deviations (n − 1) are over the jobs with status ok only. Intransigence: each ok
job against the ok ``method=joint`` (cumulative) job of the same setting but method, λ and options.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cl_runner.identity import job_dirname, parse_overrides, read_saved, select_saved, sweep_jobs, varying_keys
from cl_runner.schema import IDENTITY, METRICS, OPTIONAL_METRICS, STATUSES, identity, plain

GROUP_FIELDS = (*(k for k in IDENTITY if k != "seed"), "method_options", "other")
# Overrides already represented by an identifying field, or that do not change the result, are left
# out of the "other" part of a setting.
_COVERED = set(IDENTITY) | {"data_dir", "device", "download", "threads", "log_every"}


# ----------------------------------------------------------------------------- collect
def job_dirs(sweep_dir: Path) -> list[Path]:
    found = {p.parent for p in sweep_dir.rglob("metrics.json")}
    found |= {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()}
    # submitit keeps its pickles and logs under .submitit/: never job folders
    found = {d for d in found if ".submitit" not in d.relative_to(sweep_dir).parts and d != sweep_dir}
    return sorted(found, key=lambda d: (_job_num(d.name), str(d.relative_to(sweep_dir))))


def _job_num(name: str) -> float:
    m = re.match(r"(\d+)_|(\d+)$", name)
    return float(m.group(1) or m.group(2)) if m else math.inf


def _read_overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    with contextlib.suppress(Exception):
        saved = read_saved(path) or []  # never resolved: the folder may come from elsewhere
        if isinstance(saved, list):
            return [str(o) for o in saved]
    # no .hydra: the folder name is "<num>_<overrides>" (a best effort: values with commas split)
    m = re.match(r"\d+_(.*)$", job.name)
    return [o for o in m.group(1).split(",") if "=" in o] if m else []


def _override_map(overrides: Iterable[str]) -> dict[str, str]:
    """key → value text of a job's overrides (``+``/``~`` prefixes dropped)."""
    return {key.lstrip("+~"): value for key, _, value in (str(o).partition("=") for o in overrides)}


def _identity_from_config(job: Path | None, overrides: list[str]) -> dict[str, Any]:
    """Identifying fields of a job without metrics.json: .hydra/config.yaml, else the overrides."""
    ident: dict[str, Any] = {}
    if job is not None and (job / ".hydra" / "config.yaml").is_file():
        with contextlib.suppress(Exception):
            saved = read_saved(job / ".hydra" / "config.yaml")  # plain data: nothing resolved or evaluated
            ident = identity(saved) if isinstance(saved, dict) else {}
    try:  # fill what config.yaml did not give, with the values typed as Hydra types them
        for o in parse_overrides(overrides):
            if o.key_or_group in IDENTITY and ident.get(o.key_or_group) is None:
                ident[o.key_or_group] = o.value()
    except Exception:  # noqa: BLE001 - overrides guessed from a folder name may not parse
        pass
    return ident


def _number(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _fill(row: dict[str, Any], data: dict[str, Any] | None, job: Path | None = None) -> None:
    """A row's fields from metrics.json's ``data``; without it, the identity from the job's config."""
    ident = data if data is not None else _identity_from_config(job, row["overrides"])
    row.update({k: ident.get(k) for k in IDENTITY}, method_options=ident.get("method_options") or {})
    data = data or {}
    row.update({k: _number(data.get(k)) for k in (*METRICS, "wall_time_s")})
    row.update(accuracy_matrix=data.get("accuracy_matrix"), metric_notes=data.get("metric_notes"))


def collect(sweep_dir: str | Path, joint_dirs: Iterable[str | Path] = ()) -> list[dict[str, Any]]:
    """One row per job: every folder below ``sweep_dir`` holding ``.hydra/`` or ``metrics.json``, and
    a ``missing`` row per job of ``multirun.yaml`` without one (matched by its overrides). Fields: num,
    job (its folder, relative), status (unreadable metrics.json: failed), the identity fields, the
    metrics and intransigence (fractions), wall_time_s, method_options, overrides, accuracy_matrix,
    metric_notes, error. Without a readable metrics.json the identity comes from
    ``.hydra/config.yaml``, else the overrides. ``joint_dirs``: more intransigence references."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for job in job_dirs(sweep_dir):
        overrides = _read_overrides(job)
        num = _job_num(job.name)
        row: dict[str, Any] = {
            "num": int(num) if num != math.inf else None,
            "job": str(job.relative_to(sweep_dir)),
            "overrides": overrides,
        }
        data = None
        metrics_path = job / "metrics.json"
        if metrics_path.is_file():
            try:
                data = json.loads(metrics_path.read_text())
            except (OSError, ValueError) as e:
                row["error"] = f"unreadable metrics.json: {_one_line(e)}"
        if isinstance(data, dict):
            status = data.get("status")
            row["status"] = status if status in STATUSES and status != "missing" else "failed"
            row["error"] = data.get("error") or (
                None if status in STATUSES else f"unknown status {status!r} in metrics.json"
            )
            _fill(row, data)
        else:
            row["status"] = "failed" if metrics_path.is_file() else "missing"
            row.setdefault("error", "unreadable metrics.json" if row["status"] == "failed" else None)
            _fill(row, None, job)
        rows.append(row)
    rows += _never_started(sweep_dir, rows)
    rows.sort(key=lambda r: (math.inf if r["num"] is None else r["num"], r["job"]))
    references = [r for d in joint_dirs for r in collect(d)] if joint_dirs else []
    add_intransigence(rows, references)
    return rows


def _never_started(sweep_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``missing`` rows for the jobs of multirun.yaml that have no folder."""
    jobs = sweep_jobs(sweep_dir / "multirun.yaml")
    if not jobs:
        return []
    have = {tuple(sorted(r["overrides"])) for r in rows}
    exclude = _excluded_keys(sweep_dir / "multirun.yaml")
    varying = varying_keys(jobs) - exclude
    out = []
    for num, overrides in enumerate(jobs):
        if tuple(sorted(overrides)) in have:
            continue
        row = {"num": num, "job": job_dirname(num, overrides, varying, exclude), "overrides": overrides}
        row.update(status="missing", error="never started (no job folder)")
        _fill(row, None)
        out.append(row)
    return out


def _excluded_keys(multirun_yaml: Path) -> set[str]:
    with contextlib.suppress(Exception):
        keys = select_saved(read_saved(multirun_yaml), "hydra.job.config.override_dirname.exclude_keys")
        if isinstance(keys, list):
            return {str(k) for k in keys}
    return set()


# ----------------------------------------------------------------------------- intransigence
def _reference_key(row: dict[str, Any]) -> tuple:
    """The job's setting but the method, λ and method options: what its joint reference shares."""
    return (*(plain(row.get(k)) for k in IDENTITY if k not in ("method", "lambda")), _other_overrides(row))


def _is_joint_reference(row: dict[str, Any]) -> bool:
    return (
        row.get("method") == "joint"
        and (row.get("method_options") or {}).get("mode") == "cumulative"
        and row.get("status") == "ok"
        and bool(row.get("accuracy_matrix"))
    )


def add_intransigence(rows: list[dict[str, Any]], references: Iterable[dict[str, Any]] = ()) -> None:
    """Set ``row["intransigence"]`` (fraction) for every ok row that has a joint reference among
    ``rows`` or ``references`` (see the module docstring), else None."""
    from cl_runner.metrics import intransigence

    refs = {}
    for r in [*references, *rows]:
        if _is_joint_reference(r):
            refs.setdefault(_reference_key(r), r)
    for r in rows:
        r["intransigence"] = None
        ref = refs.get(_reference_key(r))
        if ref is None or r.get("status") != "ok" or not r.get("accuracy_matrix"):
            continue
        try:
            r["intransigence"] = intransigence(r["accuracy_matrix"], ref["accuracy_matrix"])
        except (ValueError, TypeError, IndexError):
            pass


def metrics_shown(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    return METRICS + tuple(m for m in OPTIONAL_METRICS if any(r.get(m) is not None for r in rows))


# ----------------------------------------------------------------------------- grouping
def _other_overrides(row: dict[str, Any]) -> str:
    def other(o: str) -> bool:
        key = o.lstrip("+~").partition("=")[0]
        return not (key in _COVERED or key.startswith(("method.", "hydra.")) or key == "hydra")

    return ",".join(sorted(filter(other, row.get("overrides") or [])))


def options_text(options: Any) -> str:
    return json.dumps(options or {}, sort_keys=True, default=str)


def _group_key(row: dict[str, Any]) -> tuple:
    fields = (plain(row.get(k)) if k == "lambda" else row.get(k) for k in GROUP_FIELDS[:-2])
    return (*fields, options_text(row.get("method_options")), _other_overrides(row))


def mean_std(rows: list[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[float | None, float | None]:
    """Mean and sample std of ``key`` over ``rows`` (None/NaN left out); None where undefined."""
    vals = [scale * r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    return statistics.fmean(vals) if vals else None, statistics.stdev(vals) if len(vals) > 1 else None


def group(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one setting (all identifying values but the seed) merged: n_ok, n_jobs, seeds,
    members, and ``<metric>_mean`` / ``<metric>_std`` over the ok jobs (sample std, None when
    n_ok < 2)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    out = []
    for key, members in groups.items():
        ok = [r for r in members if r.get("status") == "ok"]
        g: dict[str, Any] = dict(zip(GROUP_FIELDS, key, strict=True))
        g["lambda"] = members[0].get("lambda")
        g["method_options"] = members[0].get("method_options") or {}
        g["overrides"] = members[0].get("overrides") or []
        g["members"] = members
        g["n_jobs"] = len(members)
        g["n_ok"] = len(ok)
        g["seeds"] = sorted({r.get("seed") for r in members if r.get("seed") is not None}, key=str)
        for m in (*METRICS, *OPTIONAL_METRICS, "wall_time_s"):
            g[f"{m}_mean"], g[f"{m}_std"] = mean_std(ok, m)
        out.append(g)
    return out


def has_repeats(rows: Iterable[dict[str, Any]]) -> bool:
    """True when some setting was run with more than one seed."""
    return any(len(g["seeds"]) > 1 or g["n_jobs"] > 1 for g in group(rows))


def sweep_status(rows: Iterable[dict[str, Any]]) -> int:
    """The exit code of a sweep: 0 when every job is ok, 1 otherwise (also for no jobs at all)."""
    rows = list(rows)
    return 0 if rows and all(r.get("status") == "ok" for r in rows) else 1


# ----------------------------------------------------------------------------- swept keys
def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between the jobs (or that only some jobs set), other than
    the identifying fields, which have columns of their own, and keys that do not change results."""
    maps = [_override_map(r.get("overrides") or []) for r in rows]
    keys = sorted({k for m in maps for k in m} - _COVERED - {"hydra"})
    return [k for k in keys if not k.startswith(("hydra.", "hydra/")) and len({m.get(k) for m in maps}) > 1]


def swept_value(item: dict[str, Any], key: str) -> str:
    return _override_map(item.get("overrides") or []).get(key, "")


# ----------------------------------------------------------------------------- formatting


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
