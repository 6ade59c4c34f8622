"""Option declarations: one :class:`Spec` per option says its type, range and choices, and checking a
value against it is the only check that option gets. Used by the top-level keys
(:mod:`cl_runner.checks`), the benchmark kinds (:mod:`cl_runner.data.benchmarks`), the optimizers and
the launchers; methods and models check their options in their constructors with the same specs
(:func:`check`), so that cl-run's precheck, which builds each of them once before any folder is made,
refuses a bad value in one line naming the key.

A refusal is :class:`OptionError` (a ValueError) whose text is ``<key> must be <what>, got <value>``,
e.g. ``benchmark.max_train_per_task must be a positive integer or null (all of them), got 0``.

No torch import: the command line checks options before torch is loaded.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: the largest finite float32: a value beyond it (a λ of 1e39, a learning rate of 1e300) turns into
#: inf the moment it meets a float32 tensor, so it is refused as out of range
FLOAT32_MAX = 3.4028234663852886e38
#: the smallest positive normal float32: a positive value below it (a damping of 1e-300) is 0 there
FLOAT32_TINY = 1.1754943508222875e-38


class OptionError(ValueError):
    """A refused option value; ``key`` is the full key (``benchmark.pad``)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def show(value: Any) -> str:
    """A value as messages show it: strings quoted, everything else as printed."""
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True, kw_only=True)
class Spec:
    """Base class. ``optional``: null is a valid value, meaning ``null_means`` (shown in messages)."""

    optional: bool = False
    null_means: str = ""

    def check(self, key: str, value: Any) -> Any:
        """The value (normalized: ints stay ints, lists become lists) or :class:`OptionError`."""
        if value is None:
            if self.optional:
                return None
            raise self.error(key, value)
        return self._check(key, value)

    def _check(self, key: str, value: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def what(self) -> str:
        """What a valid value is, as the message and ``--help`` say it."""
        return self._what() + self._null()

    def _what(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _null(self) -> str:
        return f" or null{f' ({self.null_means})' if self.null_means else ''}" if self.optional else ""

    def error(self, key: str, value: Any, what: str | None = None) -> OptionError:
        return OptionError(key, f"{key} must be {what or self.what()}, got {show(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class Int(Spec):
    """An integer in [lo, hi] (either bound may be None). The message names the bound that failed."""

    lo: int | None = None
    hi: int | None = None

    def _check(self, key: str, value: Any) -> int:
        if not _is_int(value) or (self.lo is not None and value < self.lo):
            raise self.error(key, value, self._base() + self._null())
        if self.hi is not None and value > self.hi:
            raise self.error(key, value, f"{self._base()} <= {self.hi}")
        return int(value)

    def _base(self) -> str:
        if self.lo == 1:
            return "a positive integer"
        if self.lo == 0:
            return "an integer >= 0"
        return "an integer" if self.lo is None else f"an integer >= {self.lo}"

    def _what(self) -> str:
        return self._base() if self.hi is None else f"{self._base()} <= {self.hi}"


@dataclass(frozen=True, kw_only=True)
class Float(Spec):
    """A finite number between ``lo`` and ``hi`` (open bounds with ``lo_open``/``hi_open``), and one
    that float32 can hold (|value| <= 3.4e38; a positive value not below 1.2e-38, which float32 rounds
    to 0) unless ``float32=False``. ``must``: the whole ``must be …`` text, when a message was already
    worded for this option."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    float32: bool = True
    must: str | None = None

    def _bounds(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo:g}, {hi:g}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo:g}"
        if hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi:g}"
        return ""

    def _check(self, key: str, value: Any) -> float:
        if not _is_number(value):
            raise self.error(key, value, self.must or f"a number {self._bounds()}".rstrip())
        v = float(value)
        if not math.isfinite(v):
            raise self.error(key, value, self.must or f"a finite number {self._bounds()}".rstrip())
        lo, hi = self.lo, self.hi
        if (lo is not None and (v <= lo if self.lo_open else v < lo)) or (
            hi is not None and (v >= hi if self.hi_open else v > hi)
        ):
            raise self.error(key, value, self.must or self._bounds())
        if self.float32 and (abs(v) > FLOAT32_MAX or 0 < abs(v) < FLOAT32_TINY):
            raise self.error(
                key, value, f"{self.must or self._what()} that float32 can hold (between 1.2e-38 and 3.4e38 in size)"
            )
        return value

    def _what(self) -> str:
        return self.must or f"a finite number {self._bounds()}".rstrip()


@dataclass(frozen=True, kw_only=True)
class Bool(Spec):
    def _check(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, value)
        return value

    def _what(self) -> str:
        return "true or false"


@dataclass(frozen=True, kw_only=True)
class Choice(Spec):
    """One of ``choices`` (strings; YAML's bare true/false count as "true"/"false")."""

    choices: tuple[str, ...] = ()
    word: str = "not valid"  # "<key>=<value> is <word>; choose one of: …"

    def _check(self, key: str, value: Any) -> str:
        if isinstance(value, bool) and str(value).lower() in self.choices:
            value = str(value).lower()
        if not isinstance(value, str) or value not in self.choices:
            raise OptionError(key, f"{key}={show(value)} is {self.word}; choose one of: {', '.join(self.choices)}")
        return value

    def _what(self) -> str:
        return "one of: " + ", ".join(self.choices)


@dataclass(frozen=True, kw_only=True)
class Str(Spec):
    """A non-empty string (at most ``max_len`` characters)."""

    max_len: int = 1000

    def _check(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip() or len(value) > self.max_len:
            raise self.error(key, value)
        return value

    def _what(self) -> str:
        return f"a non-empty string of at most {self.max_len} characters"


@dataclass(frozen=True, kw_only=True)
class ListOf(Spec):
    """A list of ``item`` values with ``min_len``..``max_len`` entries (``unique``: no repeats)."""

    item: Spec = field(default_factory=Spec)
    min_len: int = 1
    max_len: int | None = None
    unique: bool = False

    def _check(self, key: str, value: Any) -> list:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise self.error(key, value)
        n = len(value)
        if n < self.min_len or (self.max_len is not None and n > self.max_len):
            raise self.error(key, list(value))
        out = []
        for i, v in enumerate(value):
            try:
                out.append(self.item.check(f"{key}[{i}]", v))
            except OptionError:
                raise self.error(key, list(value)) from None
        if self.unique and len(set(map(repr, out))) != len(out):
            repeated = sorted({repr(v) for v in out if sum(repr(w) == repr(v) for w in out) > 1})
            raise OptionError(key, f"{key} must not repeat a value, got {list(value)} ({', '.join(repeated)} repeated)")
        return out

    def _what(self) -> str:
        if self.max_len == self.min_len:
            size = f"{self.min_len} "
        elif self.max_len is None:
            size = "" if self.min_len <= 1 else f"at least {self.min_len} "
        else:
            size = f"{self.min_len} to {self.max_len} "
        return f"a list of {size}{self.item.what().removeprefix('a ').removeprefix('an ')}s".replace("ys ", "ies ")


@dataclass(frozen=True, kw_only=True)
class AnyOf(Spec):
    """The first of ``alternatives`` that accepts the value; the message lists them all."""

    alternatives: tuple[Spec, ...] = ()

    def _check(self, key: str, value: Any) -> Any:
        for spec in self.alternatives:
            try:
                return spec.check(key, value)
            except OptionError:
                continue
        raise self.error(key, value)

    def _what(self) -> str:
        return " or ".join(s.what() for s in self.alternatives)


@dataclass(frozen=True, kw_only=True)
class Fields(Spec):
    """A mapping with exactly the keys of ``fields``, each checked by its spec."""

    fields: tuple[tuple[str, Spec], ...] = ()

    def _check(self, key: str, value: Any) -> dict:
        if not isinstance(value, Mapping) or set(value) != {k for k, _ in self.fields}:
            raise self.error(key, value)
        return {k: spec.check(f"{key}.{k}", value[k]) for k, spec in self.fields}

    def _what(self) -> str:
        return "{" + ", ".join(f"{k}: {s.what()}" for k, s in self.fields) + "}"


@dataclass(frozen=True, kw_only=True)
class Anything(Spec):
    """Not checked here (a key whose owner checks it, e.g. a ``_target_``)."""

    optional: bool = True

    def _check(self, key: str, value: Any) -> Any:
        return value

    def _what(self) -> str:
        return "anything"


def check(key: str, value: Any, spec: Spec) -> Any:
    """``spec.check(key, value)``: one option, e.g. in a constructor."""
    return spec.check(key, value)


def unknown_key(key: str, known: Sequence[str], where: str = "") -> OptionError:
    """The refusal of a key nothing declares, with the closest declared one."""
    prefix, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f"did you mean '{f'{prefix}.' if prefix else ''}{close[0]}'?" if close else "it is not an option"
    return OptionError(key, f"unknown key '{key}'{f' in {where}' if where else ''}: {hint} (valid: {', '.join(known)})")


def check_all(prefix: str, node: Mapping[str, Any], specs: Mapping[str, Spec], where: str = "") -> dict[str, Any]:
    """Every key of ``node`` against ``specs``: a key without a spec is refused (:func:`unknown_key`),
    a missing one is checked as null. Returns the checked values."""
    dotted = f"{prefix}." if prefix else ""
    for key in node:
        if key not in specs:
            raise unknown_key(f"{dotted}{key}", sorted(specs), where)
    return {key: spec.check(f"{dotted}{key}", node.get(key)) for key, spec in specs.items()}
