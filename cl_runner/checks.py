"""The checks of a composed run config, all made before any folder exists: every top-level key from
its declaration (:data:`TOP`; a key nothing declares is refused, also one added with ``+``), then
each group by its owner — the benchmark's kind (its declared options and the memory its stream
needs), the optimizer's class, the method's and the model's constructors (built once here, so that
what they refuse is refused now), and the model against the benchmark's input shape.

Every refusal is a ValueError whose message is one line naming the key and what is valid.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from cl_runner.options import AnyOf, Anything, Bool, Choice, Float, Int, OptionError, Str, check_all
from cl_runner.schema import ACTIVE_UNITS, EVAL_EVERY, SCENARIOS

if TYPE_CHECKING:
    import torch

#: the config groups: checked by their owners, not here
GROUPS = ("benchmark", "model", "method", "optimizer")
RESUME = ("auto", "previous", "restart")

#: every top-level key of a run config (configs/config.yaml says what each one does)
TOP = {
    "seed": Int(lo=0, hi=2**32 - 1),
    "device": Str(max_len=64),
    "scenario": Choice(choices=SCENARIOS, word="unknown"),
    "active_units": Choice(choices=ACTIVE_UNITS, word="unknown"),
    "lambda": Float(lo=0, optional=True, null_means="the method has no strength"),
    # bounds: a run of more epochs or iterations than these would not end in any useful time
    "epochs": Int(lo=1, hi=100_000),
    "iterations": Int(lo=1, hi=10**9, optional=True, null_means="epochs decide"),
    "batch_size": Int(lo=1, hi=2**24),
    "eval_batch_size": Int(lo=1, hi=2**24),
    "eval_every": Choice(choices=EVAL_EVERY, word="unknown"),
    "threads": AnyOf(alternatives=(Int(lo=1, hi=4096), Choice(choices=("auto",))), optional=True),
    "reset_optimizer": Bool(),
    "clip_grad_norm": Float(lo=0, lo_open=True, optional=True, must="a number > 0 (or null: no clipping)"),
    "data_dir": Str(max_len=4096),
    "download": Bool(),
    "keep_checkpoint": Bool(),
    "log_every": Int(lo=1, hi=10**9),
    "resume": Choice(choices=RESUME),
    # a memory size: selects a preset's best arguments for it (the der2020_* presets; build.check_buffer)
    "buffer": Int(lo=1, hi=2**31 - 1, optional=True, null_means="none chosen"),
    **{group: Anything() for group in GROUPS},
}


def resolve_device(name: Any) -> torch.device:
    import torch

    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", name):
        raise ValueError(f"device={name!r} is unknown; choose one of: auto, cpu, cuda, cuda:<index>")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} asked for, but no CUDA device is available; use device=auto or cpu")
    return torch.device(name)


def check_top_level(cfg: DictConfig) -> dict[str, Any]:
    """Every top-level key against :data:`TOP` (the checked values)."""
    from cl_runner.data.stream import check_active_units

    values = check_all("", cfg, TOP, where="the run config")
    check_active_units(values["active_units"], values["scenario"])
    return values


def validate(cfg: DictConfig, read_data: bool = False) -> None:
    """All checks of a composed run config (see the module docstring); ValueError (one line).
    ``read_data``: also read and check every data file (kept for the run in this process), so that a
    missing or damaged file is refused before the run's folder is made."""
    from cl_runner.build import check_buffer
    from cl_runner.data.benchmarks import check_benchmark, check_data, check_memory, input_shape
    from cl_runner.methods import method_from_config
    from cl_runner.models import build_model
    from cl_runner.optimizers import make_optimizer_factory

    values = check_top_level(cfg)
    check_buffer(cfg)  # before the method's options resolve through the table it selects from
    device = resolve_device(values["device"])
    check_benchmark(cfg.benchmark, values["scenario"])
    check_memory(cfg.benchmark, device)  # before anything is allocated
    make_optimizer_factory(cfg.optimizer)
    method = method_from_config(cfg.method, values["lambda"])
    # options and fit to the input shape, before any data is read or folder made
    shape = input_shape(cfg.benchmark, values["data_dir"], values["download"])
    method.check_model(build_model(cfg.model, shape, 10))
    if read_data:
        check_data(cfg.benchmark, values["data_dir"], values["download"], values["seed"], keep=True)


__all__ = ["OptionError", "TOP", "validate", "resolve_device", "check_top_level"]
