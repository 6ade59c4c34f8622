"""Option checks shared by the models, from :mod:`cl_runner.options` specs: one line naming
``model.<key>`` and what it must be. A model's constructor checks each of its options with these, so
that cl-run's precheck (which builds the model once) refuses a bad value before any folder is made."""

from __future__ import annotations

from typing import Any

from cl_runner.options import Bool, Float, Int, ListOf, OptionError

#: bounds: a layer wider than this, or more layers, is a typo (it would not fit in memory anyway)
MAX_WIDTH, MAX_LAYERS = 2**16, 64
_WIDTHS = ListOf(item=Int(lo=1, hi=MAX_WIDTH), min_len=0, max_len=MAX_LAYERS)


def widths(key: str, value: Any) -> list[int]:
    """A list of positive integers (layer widths, channels), e.g. ``model.hidden=[400,400]``; an empty
    list is no such layer."""
    try:
        return _WIDTHS.check(f"model.{key}", value)
    except OptionError:
        raise OptionError(
            f"model.{key}",
            f"model.{key}={value!r} must be a list of positive integers (each at most {MAX_WIDTH}, at most "
            f"{MAX_LAYERS} of them), e.g. model.{key}=[400,400]",
        ) from None


def count(key: str, value: Any, hi: int) -> int:
    """A positive integer up to ``hi`` (a kernel size, a width)."""
    return Int(lo=1, hi=hi).check(f"model.{key}", value)


def fraction(key: str, value: Any) -> float:
    """A number in [0, 1) (a dropout probability)."""
    return float(Float(lo=0, hi=1, hi_open=True).check(f"model.{key}", value))


def flag(key: str, value: Any) -> bool:
    return Bool().check(f"model.{key}", value)
