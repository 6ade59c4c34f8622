"""The config values that identify a run, read from a composed config (in metrics.json and the
sweep summary). No torch import: the sweep summary uses it on ``.hydra/config.yaml`` files."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

FIELDS = (
    ("method", "method.name"),
    ("lambda", "lambda"),
    ("benchmark", "benchmark.name"),
    ("scenario", "scenario"),
    ("seed", "seed"),
    ("model", "model.name"),
    ("optimizer", "optimizer.name"),
)


def _select(cfg: DictConfig, path: str) -> Any:
    try:
        value = OmegaConf.select(cfg, path, throw_on_resolution_failure=False)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except Exception:  # a broken interpolation must not hide the rest (e.g. a failure being recorded)
        return None


def run_identity(cfg: DictConfig, experiment: str | None = None) -> dict[str, Any]:
    """method, lambda, benchmark, scenario, seed, model, optimizer, experiment and the method's
    options (resolved one by one, so that one broken value does not lose the others)."""
    ident: dict[str, Any] = {key: _select(cfg, path) for key, path in FIELDS}
    ident["experiment"] = experiment
    method = cfg.get("method")
    ident["method_options"] = (
        {k: _select(cfg, f"method.{k}") for k in method if k not in ("name", "lambda")}
        if isinstance(method, DictConfig)
        else {}
    )
    return ident
