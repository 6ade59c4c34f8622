"""Option checks of the method constructors: a bad value is refused with one line naming
``method.<key>`` and what is valid (the messages are asserted by the tests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if value is True and "true" in choices:  # YAML/Hydra read a bare `true` as a boolean
        value = "true"
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"method.{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
    return value


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"method.{key}={value!r} must be true or false")
    return value


def check_count(key: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer" + (" or null (all)" if allow_none else "")
        raise ValueError(f"method.{key}={value!r} must be {allowed}")
    return int(value)


def check_range(key: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValueError(f"method.{key}={value!r} must be a number in {interval}")
    return value
