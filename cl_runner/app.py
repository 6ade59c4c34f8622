"""``cl-run``: compose the config, build stream → model → method → trainer, write the results.

Errors in the user's input (unknown option or key, wrong type, out-of-range value, missing dataset)
end in one line ``error: …`` and exit code 2, without a traceback. In a multirun, a job that fails
records ``metrics.json`` with ``status: failed`` and the sweep goes on, so its summary still appears.
"""

from __future__ import annotations

import re
import sys
import time
import traceback
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from cl_runner.data.datasets import DatasetUnavailable
from cl_runner.data.stream import SCENARIOS
from cl_runner.identity import run_identity

CONFIG_MODULE = "cl_runner.configs"
USER_ERRORS = (ValueError, DatasetUnavailable)


# ----------------------------------------------------------------------------- validation
def _positive_int(cfg: DictConfig, key: str, optional: bool = False) -> int | None:
    value = cfg.get(key)
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer{' or null' if optional else ''}, got {value!r}")
    return value


def validate(cfg: DictConfig) -> None:
    """Range and type checks Hydra cannot do on plain YAML configs; raises ValueError (one line)."""
    for key in ("epochs", "batch_size", "eval_batch_size", "log_every"):
        _positive_int(cfg, key)
    _positive_int(cfg, "iterations", optional=True)
    _positive_int(cfg, "threads", optional=True)
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if cfg.scenario not in SCENARIOS:
        raise ValueError(f"scenario={cfg.scenario!r} is unknown; choose one of: {', '.join(SCENARIOS)}")
    strength = cfg.get("lambda")
    if strength is not None:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise ValueError(f"lambda must be a number >= 0, got {strength!r}")
        if strength < 0:
            raise ValueError(f"lambda must be >= 0, got {strength}")
    for key in ("reset_optimizer", "download"):
        if not isinstance(cfg.get(key), bool):
            raise ValueError(f"{key} must be true or false, got {cfg.get(key)!r}")
    resolve_device(cfg.device)
    from cl_runner.data.benchmarks import check_benchmark
    from cl_runner.methods import build_method
    from cl_runner.trainer import make_optimizer_factory

    check_benchmark(cfg.benchmark, cfg.scenario)
    make_optimizer_factory(cfg.optimizer)
    build_method(cfg.method.name, strength, identity(cfg)["method_options"])


def resolve_device(name: Any) -> "torch.device":
    import torch

    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", name):
        raise ValueError(f"device={name!r} is unknown; choose one of: auto, cpu, cuda, cuda:<index>")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} asked for, but no CUDA device is available; use device=auto or cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- the run
def identity(cfg: DictConfig) -> dict[str, Any]:
    """The config values that identify a run (in metrics.json and the sweep summary)."""
    experiment = None
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            experiment = HydraConfig.get().runtime.choices.get("experiment")
    except Exception:
        pass
    return run_identity(cfg, experiment)


def run_experiment(cfg: DictConfig, out_dir: str | Path, console=None) -> dict[str, Any]:
    """Run one experiment described by a composed config; write its files into ``out_dir``.

    Returns the content of ``metrics.json``. Raises ValueError/DatasetUnavailable for bad input.
    """
    import torch

    out_dir = Path(out_dir)
    if (out_dir / "metrics.json").exists():
        raise ValueError(f"{out_dir} already holds a finished run (metrics.json); choose another hydra.run.dir")
    validate(cfg)
    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out_dir, device, console)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DictConfig, out_dir: Path, device, console) -> dict[str, Any]:
    import torch

    from cl_runner.data.benchmarks import build_stream
    from cl_runner.loggers import ConsoleLogger, Fanout, TensorBoardLogger, write_result_files
    from cl_runner.methods import build_method
    from cl_runner.metrics import all_metrics
    from cl_runner.models import build_model
    from cl_runner.trainer import Trainer, make_optimizer_factory

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    stream = build_stream(cfg.benchmark, cfg.scenario, cfg.seed, device, cfg.data_dir, cfg.download)
    model = build_model(cfg.model, stream.input_shape, stream.n_outputs).to(device)
    ident = identity(cfg)
    method = build_method(cfg.method.name, cfg.get("lambda"), ident["method_options"])
    hparams = {k: ident[k] for k in ("method", "benchmark", "scenario", "seed", "model", "optimizer")}
    hparams["lambda"] = method.strength if method.uses_strength else None
    hparams.update({f"method.{k}": v for k, v in ident["method_options"].items()})
    hparams.update({"lr": cfg.optimizer.lr, "epochs": cfg.epochs, "iterations": cfg.iterations, "batch_size": cfg.batch_size})
    console_log = ConsoleLogger(console)
    tb = TensorBoardLogger(out_dir / "tb", len(stream), cfg.log_every)
    try:
        trainer = Trainer(
            model,
            method,
            stream,
            make_optimizer_factory(cfg.optimizer),
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            iterations=cfg.iterations,
            reset_optimizer=cfg.reset_optimizer,
            eval_batch_size=cfg.eval_batch_size,
            seed=cfg.seed,
            events=Fanout(console_log, tb),
        )
        res = trainer.run()
        result = {
            "status": "ok",
            "error": None,
            **ident,
            "lambda": hparams["lambda"],
            **all_metrics(res.matrix, res.initial),
            "accuracy_matrix": res.matrix,
            "initial_accuracy": res.initial,
            "task_names": res.task_names,
            "steps": res.steps,
            "wall_time_s": time.perf_counter() - start,
            "device": str(device),
        }
        write_result_files(out_dir, result)
        (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        tb.final(result, hparams)
    except BaseException:
        tb.failed(hparams)  # the run shows up as failed in the HParams dashboard
        raise
    finally:
        tb.close()
    console_log.final(result)
    return result


def record_failure(cfg: DictConfig, out_dir: Path, message: str, details: str | None = None) -> None:
    """A failed multirun job leaves a metrics.json with status 'failed' (never over a finished run)."""
    from cl_runner.loggers import write_result_files

    if (out_dir / "metrics.json").exists():
        return
    result = {"status": "failed", "error": message, **identity(cfg)}
    result.update({k: None for k in ("acc", "bwt", "fwt", "forgetting", "learning_accuracy", "wall_time_s")})
    write_result_files(out_dir, result)
    if details:
        (out_dir / "error.log").write_text(details)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        run_experiment(cfg, out_dir)
    except USER_ERRORS as e:
        if not multirun:
            print(f"error: {_one_line(e)}", file=sys.stderr)
            sys.exit(2)
        record_failure(cfg, out_dir, _one_line(e))
        print(f"error: job {hc.job.num} failed: {_one_line(e)}", file=sys.stderr)
    except Exception as e:
        if not multirun:
            raise  # a bug, not bad input: keep the traceback
        record_failure(cfg, out_dir, f"{type(e).__name__}: {_one_line(e)}", traceback.format_exc())
        print(f"error: job {hc.job.num} failed: {type(e).__name__}: {_one_line(e)} (see {out_dir}/error.log)", file=sys.stderr)


# ----------------------------------------------------------------------------- command line
class UsageError(Exception):
    pass


def config_groups() -> dict[str, list[str]]:
    """Config groups shipped in configs/ and their options (yaml file stems)."""
    root = resources.files(CONFIG_MODULE)
    return {
        d.name: sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith(".yaml"))
        for d in root.iterdir()
        if d.is_dir() and d.name not in ("hydra", "__pycache__")
    }


def _compose_error(e: Exception) -> str:
    msg = str(e)
    m = re.search(r"Could not override '([^']+)'", msg)
    if m:
        key = m.group(1)
        return f"unknown key '{key}': it is not in the config (`cl-run --cfg job` lists the keys; +{key}=… adds a new one)"
    if e.__cause__ is not None:
        msg = f"{msg} ({e.__cause__})"
    return " ".join(msg.replace("Error merging override", "cannot apply").split())


def precheck(argv: list[str]) -> None:
    """Check the command line before Hydra runs, so that bad input gives one line and no files."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception as e:
        raise UsageError(_one_line(e)) from None
    groups = config_groups()
    representative, sweep = [], False
    for o in overrides:
        key = o.key_or_group
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        sweep = sweep or o.is_sweep_override()
        if key in ("hydra.run.dir", "hydra.sweep.dir"):
            finished = sorted(Path(values[0]).glob("**/metrics.json")) if Path(values[0]).exists() else []
            if finished:
                raise UsageError(f"{key}={values[0]} already holds finished results ({finished[0]}); choose another folder")
        if key.startswith("hydra"):
            continue
        if key in groups and not o.is_delete():
            for v in values:
                if v not in groups[key] and v != "null":
                    raise UsageError(f"{key}={v} is not a known {key}; choose one of: {', '.join(groups[key])}")
        prefix = "+" if o.is_add() else "++" if o.is_force_add() else "~" if o.is_delete() else ""
        representative.append(f"{prefix}{key}={values[0]}" if not o.is_delete() else o.input_line)
    try:
        with hydra.initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = hydra.compose("config", overrides=representative)
    except Exception as e:
        raise UsageError(_compose_error(e)) from None
    if not (sweep or args.multirun):
        try:
            validate(cfg)
        except ValueError as e:
            raise UsageError(str(e)) from None


def main() -> None:
    try:
        precheck(sys.argv[1:])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
