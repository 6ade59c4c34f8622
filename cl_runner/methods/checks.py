"""Option checks of the method constructors: a bad value is refused with one line naming
``method.<key>`` and what is valid (the messages are asserted by the tests). cl-run's precheck builds
the method once, before any folder is made, so these are the options' one declaration.

Bounds every check keeps: a count is at most :data:`MAX_COUNT` (a buffer or a batch of 2^62 samples is
a typo that would only fail once memory runs out); a number is finite and one that float32 can hold
(beyond 3.4e38 it turns into inf, a positive value under 1.2e-38 into 0, the moment it meets a tensor)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cl_runner.options import FLOAT32_MAX, FLOAT32_TINY

#: the largest count (samples, steps, slices…) an option may ask for
MAX_COUNT = 2**31 - 1


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
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        allowed = "a positive integer" + (" or null (all)" if allow_none else "")
        if isinstance(value, int) and value > MAX_COUNT:
            allowed += f" up to {MAX_COUNT}"
        raise ValueError(f"method.{key}={value!r} must be {allowed}")
    return int(value)


def check_range(key: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"method.{key}={value!r} must be a number in {interval}")
    value = float(value)
    if not ((value > lo if lo_open else value >= lo) and value <= hi):  # NaN fails here too
        raise ValueError(f"method.{key}={value!r} must be a number in {interval}")
    if abs(value) > FLOAT32_MAX or (value != 0 and abs(value) < FLOAT32_TINY):
        raise ValueError(
            f"method.{key}={value!r} must be a number in {interval} that float32 can hold "
            "(between 1.2e-38 and 3.4e38 in size)"
        )
    return value
