"""Option checks shared by the models: one line naming the key and what it must be."""

from __future__ import annotations

from typing import Any


def widths(key: str, value: Any) -> list[int]:
    """A list of positive integers (layer widths, channels), e.g. ``model.hidden=[400,400]``."""
    try:
        items = None if isinstance(value, (str, bytes)) else list(value)
    except TypeError:
        items = None
    if items is None or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise ValueError(f"model.{key}={value!r} must be a list of positive integers, e.g. model.{key}=[400,400]")
    return [int(v) for v in items]
