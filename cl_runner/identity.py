"""Sweep jobs and their folder names, from the sweep's ``multirun.yaml`` (the run's identity fields
are in :mod:`cl_runner.schema`). No torch import: Hydra resolves ``${cl_job_dirname:}`` at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


# ----------------------------------------------------------------------------- sweep jobs and their folders
def parse_overrides(lines: list[str], config_loader: Any = None) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create(config_loader=config_loader).parse_overrides([str(x) for x in lines])


def sweep_jobs(multirun_yaml: str | Path) -> list[list[str]] | None:
    """The jobs of a sweep, in Hydra's job-number order, as each job's override list (what Hydra
    writes to the job's ``.hydra/overrides.yaml``), expanded from the sweep's ``multirun.yaml``
    (``hydra.sweeper.params`` then ``hydra.overrides.task``) with the basic sweeper's own logic.
    None when the file is absent or cannot be expanded (e.g. a sweeper other than the basic one)."""
    path = Path(multirun_yaml)
    if not path.is_file():
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        cfg = OmegaConf.load(path)
        task = OmegaConf.select(cfg, "hydra.overrides.task")
        if task is None:  # not a multirun.yaml written by Hydra
            return None
        params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
        lines = [f"{k}={v}" for k, v in params.items()] + list(task)
        batches = BasicSweeper.split_arguments(parse_overrides(lines), None)
        return [list(job) for batch in batches for job in batch]
    except Exception:  # a glob over config groups needs a config loader; other sweepers: unknown
        return None


def _key_value(override) -> tuple[str, str]:
    return override.key_or_group, override.input_line


def varying_keys(jobs: list[list[str]]) -> set[str]:
    """Keys whose value differs between the jobs (or that only some jobs set)."""
    parsed = [dict(map(_key_value, parse_overrides(job))) for job in jobs]
    return {k for k in {k for p in parsed for k in p} if len({p.get(k, "") for p in parsed}) > 1}


def job_dirname(num: int | str, overrides: list[str], varying: set[str] | None, exclude: set[str] = frozenset()) -> str:
    """``<num>_<what varies>``: the job's overrides of the keys that vary across the sweep, sorted,
    joined by commas (``3_lambda=10,method=ewc``). A deterministic function of the job's overrides
    and the sweep command, so rerunning the command into the same sweep dir finds the same folders.
    With nothing varying (or the sweep unknown: ``varying`` None) all overrides but ``exclude``
    are used, like Hydra's ``override_dirname``."""
    lines = sorted(
        line
        for key, line in map(_key_value, parse_overrides(overrides))
        if key not in exclude and (not varying or key in varying)
    )
    name = ",".join(lines).replace("/", "_")
    return f"{num}_{name}" if name else str(num)


def _job_dirname_resolver(*, _root_: DictConfig) -> str:
    """OmegaConf resolver ``${cl_job_dirname:}`` for ``hydra.sweep.subdir`` (configs/config.yaml)."""
    hc = _root_.hydra
    exclude = set(OmegaConf.select(hc, "job.config.override_dirname.exclude_keys") or [])
    jobs = sweep_jobs(Path(str(hc.sweep.dir)) / "multirun.yaml")
    varying = varying_keys(jobs) - exclude if jobs else None
    return job_dirname(hc.job.num, list(hc.overrides.task), varying, exclude)


if not OmegaConf.has_resolver("cl_job_dirname"):
    OmegaConf.register_new_resolver("cl_job_dirname", _job_dirname_resolver)
