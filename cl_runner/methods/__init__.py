"""Continual-learning methods: one module per method, ``cl_runner/methods/<name>.py`` exposing
``METHOD`` (a :class:`~cl_runner.methods.base.Method` subclass), mirrored by
``configs/method/<name>.yaml``."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from cl_runner.methods.base import Method, TrainingData, eval_mode, named_params

__all__ = ["Method", "TrainingData", "eval_mode", "named_params", "build_method"]


def build_method(name: str, strength: float | None, options: Mapping[str, Any]) -> Method:
    """Instantiate method ``name`` with strength λ and its config options.

    Raises ValueError with a one-line message for an unknown method or option.
    """
    try:
        module = importlib.import_module(f"cl_runner.methods.{name}")
        cls = module.METHOD
    except (ModuleNotFoundError, AttributeError):
        raise ValueError(f"method.name={name!r} is not a known method") from None
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        valid = sorted(p for p in params if p not in ("self", "strength"))
        raise ValueError(
            f"method {name} has no option {', '.join(unknown)}; valid options: {', '.join(valid) or 'none'}"
        )
    if not cls.uses_strength:
        if strength:
            raise ValueError(
                f"lambda={strength:g} given, but method={name} has no regularization strength; "
                "drop lambda= or choose a regularized method (l2, ewc, online_ewc, mas, si)"
            )
        strength = 0.0
    return cls(strength=float(strength or 0.0), **options)
