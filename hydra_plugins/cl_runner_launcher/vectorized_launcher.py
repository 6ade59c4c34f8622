"""cl-runner's vectorized launcher (``hydra/launcher=vectorized``): a sweep's jobs that differ only
in stackable keys train together as one stacked model in this process (``cl_runner.stacked``).

- Stackable keys: ``lambda``, ``seed``, ``optimizer.lr`` and the method's options (``method.<key>``
  other than ``name``); jobs whose composed configs (without ``hydra``) are equal on every other key
  form a group, at most ``max_members`` jobs each (memory: each member holds its model, optimizer
  state and importance).
- A group trains only if its method class declares ``stackable = True`` itself and its model has
  no active dropout; anything else (a one-job group, a method added later, a dropout model) runs
  as the basic launcher runs it, with a note in the log.
- ``forward=loop`` (``auto`` on a CPU) runs a group's jobs one after another, sharing their task
  streams: on the CPU every member would run its own kernels anyway, and member threads cost more
  than they save (``scripts/bench_sweep.py``); ``vmap`` (``auto`` on a GPU) trains them stacked.
- Every job is Hydra's ``run_job`` with the usual task function, so each job's folder, ``.hydra/``,
  ``metrics.json``, ``accuracy_matrix.csv``, TensorBoard events, HParams, failure rows and resume
  are what the basic launcher makes; the sweep summary is built from the folders as always.
"""

# no `from __future__ import annotations`: Hydra executes this module before it is in sys.modules,
# and dataclasses then cannot resolve string annotations
import functools
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

#: top-level keys a group's members may differ in (with ``optimizer.lr`` and ``method.*`` but ``name``)
STACKABLE_KEYS = ("lambda", "seed")


@dataclass
class VectorizedLauncherConf:
    _target_: str = "hydra_plugins.cl_runner_launcher.vectorized_launcher.VectorizedLauncher"
    # most jobs trained together in one group
    max_members: int = 16
    # auto (vmap on a GPU, loop on the CPU) | loop (bitwise equal to separate runs) | vmap
    forward: str = "auto"


ConfigStore.instance().store(
    group="hydra/launcher", name="cl_runner_vectorized", node=VectorizedLauncherConf, provider="cl_runner"
)


def group_key(task_cfg: DictConfig) -> str:
    """The job's composed config without ``hydra`` and without its stackable values: jobs with the
    same key can train as one group."""
    cfg = OmegaConf.to_container(task_cfg, resolve=False)
    cfg.pop("hydra", None)
    for key in STACKABLE_KEYS:
        cfg.pop(key, None)
    if isinstance(cfg.get("optimizer"), dict):
        cfg["optimizer"].pop("lr", None)
    if isinstance(cfg.get("method"), dict):
        cfg["method"] = {k: v for k, v in cfg["method"].items() if k in ("name", "_target_", "_partial_")}
    return repr(cfg)


def why_not_stacked(task_cfg: DictConfig) -> str | None:
    """Why this job cannot join a group (None if it can)."""
    from hydra.utils import get_class

    target = OmegaConf.select(task_cfg, "method._target_")
    try:
        cls = get_class(str(target))
    except Exception:  # noqa: BLE001 - a bad method fails in its own job, with its own error line
        return f"method {target} cannot be loaded"
    from cl_runner.stacked import stackable_method

    if not stackable_method(cls):
        return f"method={task_cfg.method.get('name')} is not known to be stackable"
    dropout = OmegaConf.select(task_cfg, "model.dropout", default=0) or 0
    if dropout:
        return "the model uses dropout (random masks per member)"
    if task_cfg.get("eval_every", "task") != "task":
        return f"eval_every={task_cfg.get('eval_every')} (the group evaluates after each task only)"
    return None


class VectorizedLauncher(Launcher):
    def __init__(self, max_members: int = 16, forward: str = "auto") -> None:
        super().__init__()
        from cl_runner.stacked import FORWARDS

        bad = None
        if isinstance(max_members, bool) or not isinstance(max_members, int) or max_members < 1:
            bad = f"hydra.launcher.max_members must be a positive integer, got {max_members!r}"
        elif forward not in FORWARDS:
            bad = f"hydra.launcher.forward={forward!r} is not valid; choose one of: {', '.join(FORWARDS)}"
        if bad:  # one line and exit 2, before any job runs (Hydra would wrap an exception in its own text)
            print(f"error: {bad}", file=sys.stderr)
            raise SystemExit(2)
        self.max_members, self.forward = max_members, forward
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None
        self.groups: list[list[int]] = []  # job numbers trained together (tests, the log)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _one_after_another(self, task_cfg: DictConfig) -> bool:
        """forward=loop, or auto on a CPU (auto = vmap on a GPU)."""
        from cl_runner.checks import resolve_device

        if self.forward != "auto":
            return self.forward == "loop"
        try:
            return resolve_device(task_cfg.device).type != "cuda"
        except ValueError:  # a bad device fails in its own job, with its own error line
            return True

    def _run(self, sweep_config: DictConfig, **task_options) -> JobReturn:
        """Hydra's ``run_job`` (the job's folder, ``.hydra/``, its log) with cl-run's task function
        given ``task_options`` (``parts``: a shared stream cache; ``primed``: open the run only)."""
        ret = run_job(
            hydra_context=self.hydra_context,
            task_function=functools.partial(self.task_function, **task_options),
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def _group(self, batch: list[int], configs: list[DictConfig], runs: dict[int, JobReturn], cache) -> None:
        """``forward=vmap``: open every member's run (through run_job), advance them together
        (cl_runner.stacked.Group), then conclude each as a separate run would."""
        from cl_runner.app import Job, conclude
        from cl_runner.run import RunParts
        from cl_runner.stacked import Group

        group = Group(self.forward, log=log.info)
        opened: dict[int, tuple[JobReturn, object]] = {}
        parts = RunParts(build_stream=cache, quiet=True)
        for i in batch:
            ret = self._run(configs[i], parts=parts, primed=True)
            runs[i] = ret
            if ret.status == JobStatus.COMPLETED and ret.return_value is not None:
                phases, first = ret.return_value
                opened[i] = (ret, group.add(phases, first))
        group.run()
        interrupted = group.interrupted
        for i, (ret, member) in opened.items():
            ret.return_value = member.result
            if member.error is not None:
                job = Job(configs[i], Path(ret.working_dir), configs[i].hydra.job.num)
                try:
                    conclude(member.error, job)
                except KeyboardInterrupt:
                    interrupted = True
        if interrupted:
            raise KeyboardInterrupt

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from cl_runner.run import RunParts
        from cl_runner.stacked import stream_cache

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs locally, stacking those that differ only in {self._keys()}")
        configs: list[DictConfig] = []
        groups: dict[str, list[int]] = {}
        alone: dict[int, str] = {}
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id = idx
                cfg.hydra.job.num = idx
            configs.append(cfg)
            why = why_not_stacked(cfg)
            if why:
                alone[i] = why
            else:
                groups.setdefault(group_key(cfg), []).append(i)
        batches: list[list[int]] = []
        for members in groups.values():
            for s in range(0, len(members), self.max_members):
                batches.append(members[s : s + self.max_members])
        runs: dict[int, JobReturn] = {}
        for batch in batches:
            if len(batch) == 1:
                alone[batch[0]] = "no other job of the sweep differs from it only in stackable keys"
                continue
            numbers = [initial_job_idx + i for i in batch]
            self.groups.append(numbers)
            jobs = ", ".join(f"#{n}" for n in numbers)
            cache = stream_cache()
            if self._one_after_another(configs[batch[0]]):
                # forward=loop: stacking gains nothing when every member runs its own kernels anyway;
                # the jobs run as the basic launcher would (bitwise its results at any thread count),
                # building each task stream once
                log.info(f"vectorized: jobs {jobs} form one group (forward=loop: one after another, one task stream)")
                for i in batch:
                    runs[i] = self._run(configs[i], parts=RunParts(build_stream=cache))
                continue
            log.info(f"vectorized: jobs {jobs} train as one stacked group")
            self._group(batch, configs, runs, cache)
        for i in sorted(alone):
            log.info(f"vectorized: job #{initial_job_idx + i} runs alone: {alone[i]}")
            runs[i] = self._run(configs[i])
        return [runs[i] for i in range(len(job_overrides))]

    @staticmethod
    def _keys() -> str:
        return ", ".join((*STACKABLE_KEYS, "optimizer.lr", "method.<option>"))
