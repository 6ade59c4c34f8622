"""Sweep jobs and their folder names, from the sweep's ``multirun.yaml`` (the run's identity fields
are in :mod:`cl_runner.schema`); :func:`read_saved`, the one way to read a config file saved in a run
or sweep folder. No torch import: Hydra resolves ``${cl_job_dirname:}`` at start-up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

# ----------------------------------------------------------------------------- saved configs
#: a value that is exactly a reference to another key of the same file: ``${method.lambda}``
_REFERENCE = re.compile(r"\$\{\s*([A-Za-z_][\w-]*(?:\.[\w-]+)*)\s*\}")
#: a saved config is a few kB: larger files, or YAML aliases that expand to more values, are refused
MAX_SAVED_BYTES = 16 * 2**20
MAX_SAVED_VALUES = 200_000


def read_saved(path: str | Path) -> Any:
    """A YAML file of a run or sweep folder (``.hydra/config.yaml``, ``.hydra/overrides.yaml``,
    ``multirun.yaml``) as plain Python data (dicts, lists, strings, numbers, bools, None), evaluating
    nothing: such a folder may come from elsewhere. OmegaConf's YAML loader (a safe loader: YAML tags
    cannot build Python objects, so no code runs), and no OmegaConf node is made, so no resolver can
    run: ``${oc.env:HOME}`` or ``${any_resolver:...}`` stays literal text (OmegaConf would resolve it on
    access, putting the reader's environment or a resolver's output in the summary). The one
    interpolation followed is a value that is exactly a reference to another key of the same file
    (``lambda: ${method.lambda}``, as Hydra saves every composed config), looked up in the data, never
    evaluated; a reference to a missing key, to a node, a cycle or anything else stays literal.
    Raises OSError / ValueError (``yaml.YAMLError`` is one) on an unreadable, malformed or oversized file."""
    path = Path(path)
    if path.stat().st_size > MAX_SAVED_BYTES:
        raise ValueError(f"{path} is larger than {MAX_SAVED_BYTES} bytes: not a saved config")
    try:
        from omegaconf._utils import get_yaml_loader  # OmegaConf's own reading of numbers (1e-3: a float)

        loader = get_yaml_loader()
    except ImportError:  # pragma: no cover - another OmegaConf layout
        loader = yaml.SafeLoader
    with open(path, encoding="utf-8") as f:
        data = yaml.load(f, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    budget = [MAX_SAVED_VALUES]
    return _follow(data, data, budget)


def _follow(node: Any, root: Any, budget: list[int]) -> Any:
    """``node`` as plain data (a copy) with its references to other keys replaced by their values."""
    budget[0] -= 1
    if budget[0] < 0:  # YAML aliases can make a small file hold exponentially many values
        raise ValueError(f"more than {MAX_SAVED_VALUES} values: not a saved config")
    if isinstance(node, dict):
        return {k: _follow(v, root, budget) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_follow(v, root, budget) for v in node]
    if isinstance(node, str):
        return _reference(node, root)
    if node is None or isinstance(node, (bool, int, float)):
        return node
    return str(node)  # e.g. a pathlib.Path built by OmegaConf's loader


def _reference(text: str, root: Any, seen: tuple[str, ...] = ()) -> Any:
    """The value ``text`` refers to when it is exactly ``${a.b.c}`` and that key holds a scalar (itself
    followed, at most 16 deep, never round a cycle); else ``text`` unchanged."""
    m = _REFERENCE.fullmatch(text)
    if m is None or m.group(1) in seen or len(seen) >= 16:
        return text
    value = root
    for part in m.group(1).split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return text
    if isinstance(value, str):
        followed = _reference(value, root, (*seen, m.group(1)))
        return text if _REFERENCE.fullmatch(str(followed)) else followed
    return value if value is None or isinstance(value, (bool, int, float)) else text


def select_saved(data: Any, path: str) -> Any:
    """``data``'s value at the dotted ``path`` (``hydra.overrides.task``) in plain data; None when absent."""
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


# ----------------------------------------------------------------------------- sweep jobs and their folders
def parse_overrides(lines: list[str], config_loader: Any = None) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create(config_loader=config_loader).parse_overrides([str(x) for x in lines])


def sweep_jobs(multirun_yaml: str | Path) -> list[list[str]] | None:
    """The jobs of a sweep, in Hydra's job-number order, as each job's override list (what Hydra
    writes to the job's ``.hydra/overrides.yaml``), expanded from the sweep's ``multirun.yaml``
    (``hydra.sweeper.params`` then ``hydra.overrides.task``, read with :func:`read_saved`: the
    override texts as Hydra wrote them, nothing resolved) with the basic sweeper's own logic.
    None when the file is absent or cannot be expanded (e.g. a sweeper other than the basic one)."""
    path = Path(multirun_yaml)
    if not path.is_file():
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        cfg = read_saved(path)
        task = select_saved(cfg, "hydra.overrides.task")
        params = select_saved(cfg, "hydra.sweeper.params") or {}
        if not isinstance(task, list) or not isinstance(params, dict):  # not a multirun.yaml written by Hydra
            return None
        lines = [f"{k}={v}" for k, v in params.items()] + [str(t) for t in task]
        parsed = parse_overrides(lines)
        if _job_count(parsed) > MAX_SWEEP_JOBS:  # `seed=range(0,1000000000)` would fill the memory
            return None
        batches = BasicSweeper.split_arguments(parsed, None)
        return [list(job) for batch in batches for job in batch]
    except Exception:  # a glob over config groups needs a config loader; other sweepers: unknown
        return None


#: a multirun.yaml that expands to more jobs than this is not expanded (a folder from elsewhere must not
#: make the summary allocate without bound)
MAX_SWEEP_JOBS = 1_000_000


def _job_count(overrides: list) -> float:
    """How many jobs the basic sweeper would make of ``overrides``, without expanding them."""
    import math

    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep

    count = 1.0
    for o in overrides:
        if not o.is_sweep_override():
            continue
        sweep = o.value()
        if isinstance(sweep, ChoiceSweep):
            count *= len(sweep.list)
        elif isinstance(sweep, RangeSweep) and sweep.step:
            count *= max(0, math.ceil((sweep.stop - sweep.start) / sweep.step))
    return count


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
