"""The spec types of benchmark options that :mod:`cl_runner.options` does not have: a benchmark's name,
a dataset (a registered name or a dataset class by ``_target_``), a data file's path, ``normalize``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cl_runner.data import arrays
from cl_runner.data.datasets import LOADERS
from cl_runner.options import (
    AnyOf,
    Fields,
    Float,
    ListOf,
    OptionError,
    Spec,
    show,
)


@dataclass(frozen=True)
class Name(Spec):
    """A benchmark's name (it goes into run folder names and summaries)."""

    def _check(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}", value):
            raise self.error(key, value)
        return value

    def _what(self) -> str:
        return "a name of letters, digits and _ . + - (at most 100 characters)"


@dataclass(frozen=True)
class Described(ListOf):
    """A list whose items are described in words (``what``) rather than from their spec."""

    described: str = ""

    def _what(self) -> str:
        return self.described or super()._what()


@dataclass(frozen=True)
class DatasetName(Spec):
    """The name of a registered dataset (checked against the registry when the value is checked)."""

    def _check(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in LOADERS:
            raise OptionError(key, f"{key}={show(value)} is not valid; choose one of: {', '.join(sorted(LOADERS))}")
        return value

    def _what(self) -> str:
        return "one of: " + ", ".join(sorted(LOADERS))


@dataclass(frozen=True)
class DatasetNames(ListOf):
    """A list of registered datasets' names (the sequence kind's ``datasets``)."""

    item: Spec = DatasetName()

    def _what(self) -> str:
        return f"a list of dataset names from: {', '.join(sorted(LOADERS))}"


@dataclass(frozen=True)
class Dataset(Spec):
    """A registered dataset's name, or ``{_target_: <a dataset class>, <its constructor arguments>}``."""

    def _check(self, key: str, value: Any) -> Any:
        if isinstance(value, Mapping):
            if "_target_" not in value:
                raise self.error(key, dict(value))
            return dict(value)
        if not isinstance(value, str) or value not in LOADERS:
            raise OptionError(
                key,
                f"{key}={show(value)} is not valid; choose one of: {', '.join(sorted(LOADERS))} "
                "(or {_target_: <a dataset class>, <its arguments>})",
            )
        return value

    def _what(self) -> str:
        return f"one of {', '.join(sorted(LOADERS))} or {{_target_: <a dataset class>, <its arguments>}}"


@dataclass(frozen=True)
class DataPath(Spec):
    def _check(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip() or not value.lower().endswith(arrays.SUFFIXES):
            raise self.error(key, value)
        return value

    def _what(self) -> str:
        return "the path of an .npz file (numpy.savez) or a .pt file (torch.save of a dict of tensors)"


NORMALIZE_FIELDS = Fields(
    fields=(
        ("mean", AnyOf(alternatives=(Float(), Described(item=Float(), described="a list of one per channel")))),
        (
            "std",
            AnyOf(
                alternatives=(
                    Float(lo=0, lo_open=True),
                    Described(item=Float(lo=0, lo_open=True), described="a list of one per channel (each > 0)"),
                )
            ),
        ),
    )
)


@dataclass(frozen=True)
class Normalize(Spec):
    """``auto`` or ``{mean, std}`` (std > 0; one value or one per channel)."""

    def _check(self, key: str, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, Mapping):
            return NORMALIZE_FIELDS.check(key, value)
        raise self.error(key, value)

    def _what(self) -> str:
        return "auto or {mean: a number or one per channel, std: a number > 0 or one per channel}"
