"""Continual-learning methods: one module per method, ``cl_runner/methods/<name>.py`` with a
:class:`~cl_runner.methods.base.Method` subclass, and one config, ``configs/method/<name>.yaml``,
whose ``_target_`` names that class (Hydra's instantiation builds it; no registry)."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import Any

from omegaconf import OmegaConf

from cl_runner.build import options, partial, unknown_options
from cl_runner.methods.base import Method, TrainingData, eval_mode, named_params

__all__ = ["Method", "TrainingData", "eval_mode", "named_params", "build_method", "method_from_config"]


def method_from_config(node: Any, strength: float | None) -> Method:
    """The method of a composed ``method`` config node with strength λ (the run's ``lambda``).

    Raises ValueError with a one-line message for an unknown option or a λ the method cannot take.
    """
    name = node.get("name")
    make = partial(node, "method")
    bad = unknown_options(make.func, options(node), skip=("strength",))
    if bad:
        raise ValueError(
            f"method {name} has no option {', '.join(bad)}; valid options: {', '.join(bad.valid) or 'none'}"
        )
    if not make.func.uses_strength:
        if strength:
            raise ValueError(
                f"lambda={strength:g} given, but method={name} has no regularization strength "
                "(its config's lambda is null); drop lambda= or choose a method whose config sets a lambda"
            )
        strength = 0.0
    return make(strength=float(strength or 0.0))


def build_method(name: str, strength: float | None, options: Mapping[str, Any]) -> Method:
    """Method ``name`` of the shipped ``configs/method/<name>.yaml`` with strength λ and ``options``
    (tests, scripts); the options not given take that file's values, the one place for defaults."""
    path = resources.files("cl_runner.configs") / "method" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"method.name={name!r} is not a known method")
    node = OmegaConf.load(str(path))
    return method_from_config({**OmegaConf.to_container(node), **options}, strength)
