"""The run schema: the names and formats that metrics.json, accuracy_matrix.csv, the terminal,
TensorBoard and the sweep summary share. One place for each: a new metric or identity field is added
here and every report follows. No torch import (the sweep summary reads job folders with it).

Formatting: metrics are stored as fractions and shown in percent with two decimals, the sign as
Python prints it (``-54.50``, no ``+``); a missing value is blank (the terminal shows ``n/a``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

METRICS = ("acc", "bwt", "fwt", "forgetting", "learning_accuracy")
#: computed by the sweep summary only (it needs the joint reference runs)
OPTIONAL_METRICS = ("intransigence",)
TITLES = dict(
    acc="ACC", bwt="BWT", fwt="FWT", forgetting="forgetting", learning_accuracy="LA", intransigence="intransigence"
)
STATUSES = ("ok", "failed", "diverged", "interrupted", "cancelled", "timeout", "missing")
#: a run folder whose metrics.json has one of these statuses is never run again nor overwritten; every
#: other status (interrupted, failed, cancelled, timeout) is resumed by the same command
FINAL = ("ok", "diverged")
#: the scenarios (README: Scenarios); class-IL's active units: the seen-class mask, or the whole head
SCENARIOS = ("task", "domain", "class")
ACTIVE_UNITS = ("seen", "all")
#: when the trainer tests every task: after each task, or also after every epoch (curves)
EVAL_EVERY = ("task", "epoch")
#: identity field → its path in the composed config (``experiment``: Hydra's choice of that group)
IDENTITY = {
    "method": "method.name",
    "lambda": "lambda",
    "benchmark": "benchmark.name",
    "scenario": "scenario",
    "seed": "seed",
    "model": "model.name",
    "optimizer": "optimizer.name",
    "experiment": None,
}
#: identity fields that tables show only when they vary between jobs
SETTINGS = ("model", "optimizer", "experiment")


def _select(cfg: Any, path: str) -> Any:
    if not isinstance(cfg, DictConfig):  # plain data (a saved config): looked up, never evaluated
        for part in path.split("."):
            if not isinstance(cfg, Mapping) or part not in cfg:
                return None
            cfg = cfg[part]
        return cfg
    try:
        value = OmegaConf.select(cfg, path, throw_on_resolution_failure=False)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except Exception:  # a broken interpolation must not hide the rest (e.g. a failure being recorded)
        return None


def identity(cfg: DictConfig | Mapping[str, Any], experiment: str | None = None) -> dict[str, Any]:
    """The :data:`IDENTITY` fields of a config and ``method_options`` (the method node but its labels
    and ``_…_`` keys), each read on its own so that one broken value loses nothing else.

    ``cfg`` is either the run's own composed config (a DictConfig: its interpolations are resolved,
    as the run resolves them) or plain data, a config saved in a run or sweep folder as
    :func:`cl_runner.identity.read_saved` returns it: looked up only, nothing evaluated. A config
    read from a folder must never be passed as a DictConfig (``OmegaConf.load``): resolving it
    would run whatever resolvers the file names."""
    ident = {key: _select(cfg, path) if path else experiment for key, path in IDENTITY.items()}
    method = cfg.get("method") if isinstance(cfg, (DictConfig, Mapping)) else None
    if not isinstance(method, (DictConfig, Mapping)):
        ident["method_options"] = {}
        return ident
    keys = [k for k in method if k not in ("name", "lambda") and not str(k).startswith("_")]
    if isinstance(method, DictConfig):
        ident["method_options"] = {k: _select(cfg, f"method.{k}") for k in keys}
    else:
        ident["method_options"] = {k: method[k] for k in keys}
    return ident


def plain(v: Any) -> str:
    """A value in a table cell: floats as ``%g``, None blank."""
    return "" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def pct(v: float | None, blank: str = "") -> str:
    """A fraction in percent, two decimals; ``blank`` for None/NaN."""
    return blank if v is None or math.isnan(v) else f"{100 * v:.2f}"


def pct_pm(mean: float | None, std: float | None) -> str:
    """``mean ± std`` in percent (``mean`` alone without a std)."""
    return pct(mean) + ("" if mean is None or std is None else f" ± {100 * std:.2f}")


def printable(value: Any) -> str:
    """``value`` as text safe for a terminal: control characters (escape sequences, carriage returns,
    line breaks…) shown as ``\\x1b``, ``\\r``, ``\\n``. For text from files (errors, overrides, names,
    paths), which is also printed without rich markup (``rich.text.Text``, ``markup=False``)."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def md_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; ``|`` and line breaks inside cells are escaped."""

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])
