"""The ``optimizer`` config node → a factory ``model → optimizer`` (its ``_target_``, any
``torch.optim`` class or a user's own), with every option checked before a run starts.

The options torch's optimizers share are declared once here (:data:`OPTIONS`) and checked by key, so a
bad value is one line naming ``optimizer.<key>``; an option the class does not take is refused with
the class's own valid options; and the optimizer is then built once on a dummy parameter, so whatever
else the class itself refuses (its own checks) is caught before any folder is made, in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from cl_runner.build import options, partial, unknown_options
from cl_runner.options import Bool, Float, ListOf, OptionError

#: declarations of the options of torch.optim's optimizers (others are checked by the class itself)
OPTIONS = {
    "lr": Float(lo=0, lo_open=True, must="> 0 and finite"),
    "weight_decay": Float(lo=0, must=">= 0 and finite"),
    "momentum": Float(lo=0, hi=1, hi_open=True),
    "dampening": Float(lo=0, hi=1),
    "betas": ListOf(item=Float(lo=0, hi=1, hi_open=True), min_len=2, max_len=2),
    "eps": Float(lo=0, lo_open=True),
    "alpha": Float(lo=0, hi=1),
    "lr_decay": Float(lo=0),
    "initial_accumulator_value": Float(lo=0),
    "rho": Float(lo=0, hi=1),
    "nesterov": Bool(),
    "amsgrad": Bool(),
    "centered": Bool(),
    "maximize": Bool(),
}


def make_optimizer_factory(cfg: Mapping[str, Any]) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """model → optimizer over its parameters: the node's ``_target_`` with its options, each checked
    (see the module docstring); ValueError (one line) for a bad option."""
    make = partial(cfg, "optimizer")
    given = options(cfg)
    bad = unknown_options(make.func, given, skip=("params",))
    if bad:
        raise ValueError(
            f"optimizer {cfg.get('name')} has no option {', '.join(bad)}; valid options: {', '.join(bad.valid)}"
        )
    for key, value in given.items():
        if key in OPTIONS:
            OPTIONS[key].check(f"optimizer.{key}", value)
    if "lr" not in given:
        raise OptionError("optimizer.lr", "optimizer.lr must be given (> 0 and finite)")
    # numbers as floats (an integer lr from the command line gives the same param_groups as a float)
    numbers = {k: float(given[k]) for k in ("lr", "weight_decay") if k in given}
    try:  # the class's own checks (e.g. a nesterov SGD needs momentum > 0)
        make([nn.Parameter(torch.zeros(1))], **numbers)
    except (TypeError, ValueError, RuntimeError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"optimizer {cfg.get('name')} ({make.func.__module__}.{make.func.__name__}): {text}") from None
    return lambda m: make(m.parameters(), **numbers)
