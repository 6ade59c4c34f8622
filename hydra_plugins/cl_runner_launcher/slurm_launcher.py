"""cl-runner's Slurm launcher: hydra-submitit-launcher's ``SlurmLauncher`` with what a shared
cluster needs (``hydra/launcher=slurm``, preset ``cl_runner/configs/hydra/launcher/slurm.yaml``).

In the ``cl-run`` process (:meth:`ClRunnerSlurmLauncher.launch`):
- sbatch's rejection (bad partition, gres, account, too many CPUs) → one ``error:`` line naming the
  ``hydra.launcher.*`` key and Slurm's message, exit 2; so is an array pending for a reason that never
  resolves (``PartitionConfig``…), after cancelling it;
- the job array's id is printed at submission; the array is named ``cl-run:<method>:<swept keys>``
  (a name is made of a safe character set, at most 80 characters: ``cl_runner.slurm.safe_name``; it is
  a line of the sbatch script); a launcher setting whose text would break out of its ``#SBATCH``
  line (a line break in ``partition``, in ``hydra.sweep.dir``…) is refused with one ``error:`` line,
  exit 2, before anything is submitted (``cl_runner.slurm.script_problem``);
- it waits for every job however it ends (one ``squeue`` and one ``sacct`` per poll) and records
  ``cancelled`` / ``timeout`` / ``failed`` in the folders of jobs that did not write a final status
  themselves (``cl_runner.slurm.outcome``), so the summary always has one row per job; Ctrl-C cancels
  the array, records the same and writes the summary.

In each job (:meth:`ClRunnerSlurmLauncher.__call__`, run by submitit on the node; the signal handling
is ``cl_runner.slurm.job_signals``):
- SIGUSR2 (``--signal=USR2@signal_delay_s``, before the time limit or at preemption) goes to
  submitit, which calls :meth:`checkpoint` (the same job callable, same folder) and requeues the job:
  the run resumes from its last finished task. Out of requeues (``max_num_timeout``), the run is
  interrupted instead (a ``KeyboardInterrupt`` inside it: it saves its finished tasks as
  ``interrupted``) and the job records ``timeout``;
- SIGTERM (scancel, preemption, the time limit itself) interrupts the run the same way, unless a
  requeue is under way; the launcher then labels the job from Slurm's state;
- the running job renames itself ``cl-run:<method>:<its overrides>``.
"""

# no `from __future__ import annotations`: Hydra executes this module before it is in sys.modules,
# and dataclasses then cannot resolve string annotations
import contextlib
import io
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict

from cl_runner.slurm import first_word

log = logging.getLogger(__name__)

try:  # hydra-submitit-launcher is optional (the `launchers` extra): without it, register nothing
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # pragma: no cover - exercised only without the extra
    SlurmLauncher = None

#: Slurm states in which a job may still run (sacct), as submitit counts them
_LIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "COMPLETING",
    "CONFIGURING",
    "RESIZING",
    "SUSPENDED",
    "PREEMPTED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "SIGNALING",
    "STAGE_OUT",
    "UNKNOWN",
}


def _sacct(array_id: str) -> dict[str, str]:
    """{"<array>_<index>": state} for the array's tasks (one sacct call); {} when sacct fails."""
    from submitit.slurm.slurm import read_job_id

    try:
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-j", array_id, "-o", "JobID,State"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    states: dict[str, str] = {}
    for line in out.stdout.splitlines():
        jid, _, state = line.partition("|")
        try:
            parts = read_job_id(jid.strip())
        except Exception:  # noqa: BLE001 - an id sacct prints oddly: skip it
            continue
        for p in parts:
            if len(p) == 3:
                for i in range(int(p[1]), int(p[2]) + 1):
                    states[f"{p[0]}_{i}"] = state.strip()
            elif len(p) == 2:
                states[f"{p[0]}_{p[1]}"] = state.strip()
    return states


def _squeue(array_id: str) -> dict[str, tuple[str, str]] | None:
    """{"<array>_<index>": (state, reason)} of the array's tasks still in the queue (squeue -r lists
    pending tasks one by one); None when squeue fails."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-j", array_id, "-o", "%i|%T|%r"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:  # also "Invalid job id" once the whole array left the queue: then nothing is live
        return {} if "invalid job id" in out.stderr.lower() else None
    queue = {}
    for line in out.stdout.splitlines():
        jid, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        queue[jid.strip()] = (state.strip(), reason.strip())
    return queue


if SlurmLauncher is not None:

    @dataclass
    class ClRunnerSlurmConf(SlurmQueueConf):
        _target_: str = "hydra_plugins.cl_runner_launcher.slurm_launcher.ClRunnerSlurmLauncher"
        # "cl-run": cl-run:<method>:<overrides> per job; anything else is used as it is, in the same
        # safe character set as those ([A-Za-z0-9._:=,+@-], others become _; at most 80 characters)
        name: str = "cl-run"
        # seconds between two looks at the jobs' states (sacct, squeue)
        poll_s: float = 10.0

    ConfigStore.instance().store(
        group="hydra/launcher", name="cl_runner_slurm", node=ClRunnerSlurmConf, provider="cl_runner"
    )

    class ClRunnerSlurmLauncher(SlurmLauncher):
        def __init__(self, **params: Any) -> None:
            self.poll_s = float(params.pop("poll_s", 10.0))
            super().__init__(**params)

        # ------------------------------------------------------------------ in the job
        def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state) -> JobReturn:
            import submitit

            from cl_runner import slurm

            slurm.job_signals()
            if self.params.get("name") == "cl-run":
                name = _job_name(sweep_overrides, self.config)  # a safe character set (argv: no shell either)
                subprocess.run(
                    ["scontrol", "update", f"JobId={submitit.JobEnvironment().job_id}", f"JobName={name}"],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            try:
                return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
            except KeyboardInterrupt:
                if slurm.STOP["why"] != "timeout":
                    print(f"cl-run: job {job_num} stopped by a signal; finished tasks are kept", file=sys.stderr)
                    raise SystemExit(143) from None
                from cl_runner.slurm import finished_tasks, outcome_message, record_outcome

                cfg, out_dir = self._job_config(sweep_overrides, job_num)
                jid = submitit.JobEnvironment().job_id
                message = outcome_message("timeout", jid, "TIMEOUT", self.params, finished_tasks(out_dir))
                record_outcome(out_dir, cfg, "timeout", message)
                print(f"cl-run: job {job_num}: {message}", file=sys.stderr)
                raise SystemExit(1) from None

        def _job_config(self, overrides: Sequence[str], num: int) -> tuple[Any, Path]:
            """The job's composed config and its folder (hydra.sweep.dir/hydra.sweep.subdir), as run_job makes them."""
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = num
            return cfg, Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)

        # ------------------------------------------------------------------ in cl-run
        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            import submitit
            from submitit.core.utils import FailedJobError

            from cl_runner import slurm

            jobs_cfg = [self._job_config(o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
            params = self._params(jobs_cfg)
            executor = submitit.AutoExecutor(
                folder=params.pop("submitit_folder"),
                cluster="slurm",
                slurm_max_num_timeout=params.pop("max_num_timeout"),
            )
            base = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            args = []
            for i, overrides in enumerate(job_overrides):
                idx = initial_job_idx + i
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
                args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", _singletons()))
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's stderr raw
                    jobs = executor.map_array(self, *zip(*args, strict=True))
            except FailedJobError as e:
                _fail(slurm.sbatch_error(str(e), self.params | {"mem_gb": params["mem_gb"]}, slurm.partitions()))
            array_id = jobs[0].job_id.split("_")[0]
            print(
                f"Slurm job array {array_id}: {len(jobs)} jobs ({jobs[0].job_id} … {jobs[-1].job_id}), "
                f"name {params['name']}, at most {params['array_parallelism']} at a time; "
                f"squeue -j {array_id} shows them, scancel {array_id} stops the sweep",
                flush=True,
            )
            try:
                states = self._wait(array_id, [j.job_id for j in jobs], params)
            except KeyboardInterrupt:
                print(f"cl-run: interrupted: cancelling Slurm job array {array_id}", file=sys.stderr, flush=True)
                subprocess.run(["scancel", array_id], check=False, timeout=60)
                states = self._wait(array_id, [j.job_id for j in jobs], params, limit_s=60)
                self._record(jobs, jobs_cfg, states, params)
                raise  # cl-run writes the summary of an interrupted sweep (cl_runner.app.main)
            self._record(jobs, jobs_cfg, states, params)
            return [
                JobReturn(
                    overrides=list(o),
                    cfg=c,
                    hydra_cfg=None,
                    working_dir=str(d),
                    task_name=str(c.hydra.job.name),
                    status=JobStatus.COMPLETED,
                    _return_value=None,
                )
                for o, (c, d) in zip(job_overrides, jobs_cfg, strict=True)
            ]

        def _params(self, jobs_cfg: list) -> dict[str, Any]:
            """The launcher's settings for this sweep: memory from the benchmarks when not given, the
            array's name from a safe character set; one ``error:`` line for a setting that would break
            out of its line of the job script."""
            from cl_runner import slurm

            params = dict(self.params)
            if params.get("mem_gb") is None:
                params["mem_gb"] = slurm.default_mem_gb(c.benchmark.name for c, _ in jobs_cfg)
            if params.get("name") == "cl-run":
                params["name"] = _job_name(OmegaConf.to_container(self.config.hydra.overrides.task), self.config)
            else:  # the user's own name: the same safe character set (it is a line of the job script)
                params["name"] = slurm.safe_name(params.get("name") or "cl-run")
            problem = slurm.script_problem(params)
            if problem:
                _fail(problem)
            return params

        def _wait(self, array_id: str, ids: list[str], params: dict, limit_s: float | None = None) -> dict:
            """Poll until no job of the array is in the queue (squeue); report progress when it changes;
            stop on a pending reason that never resolves. Returns {job id: final state (sacct), or None
            without accounting} for the jobs no longer in the queue."""
            from cl_runner import slurm

            start, last, warned = time.monotonic(), None, set()
            while True:
                queue = _squeue(array_id)
                states = _sacct(array_id)
                if queue is None:  # squeue failed: judge from sacct alone
                    queue = {
                        i: (states.get(i, "PENDING"), "") for i in ids if first_word(states.get(i, "PENDING")) in _LIVE
                    }
                live = [i for i in ids if i in queue]
                if not live or (limit_s is not None and time.monotonic() - start > limit_s):
                    break
                for jid in live:
                    state, reason = queue[jid]
                    keys = slurm.stuck_reason(reason) if state == "PENDING" else None
                    if keys and limit_s is None:
                        subprocess.run(["scancel", array_id], check=False, timeout=60)
                        _fail(
                            f"{slurm.launcher_keys(keys, params)}: Slurm job {jid} cannot start: pending with reason "
                            f"{reason}, which waiting does not resolve; the job array {array_id} was cancelled"
                        )
                    if state == "PENDING" and reason.startswith("ReqNodeNotAvail") and reason not in warned:
                        warned.add(reason)
                        print(
                            f"cl-run: Slurm job {jid} pending: {reason} (nodes down, drained or reserved); waiting",
                            file=sys.stderr,
                            flush=True,
                        )
                count: dict[str, int] = {}
                for i in ids:
                    word = first_word(queue[i][0] if i in queue else states.get(i, "ended")).lower()
                    count[word] = count.get(word, 0) + 1
                now = ", ".join(f"{n} {w}" for w, n in sorted(count.items()))
                if now != last:
                    print(f"Slurm job array {array_id}: {now}", flush=True)
                    last = now
                time.sleep(self.poll_s)
            for _ in range(15):  # accounting may lag behind the queue by a few seconds
                if all(first_word(states.get(i)) not in _LIVE for i in ids if i not in live):
                    break
                time.sleep(2)
                states = _sacct(array_id)
            # with accounting, a job sacct never saw left the queue before it started: cancelled while pending
            never = "CANCELLED (while pending)" if states else None
            return {i: states.get(i) or never for i in ids if i not in live}

        def _record(self, jobs, jobs_cfg, states: dict[str, str], params: dict) -> None:
            """Record cancelled / timeout / failed in the folders of jobs that did not end with a final status."""
            from cl_runner import record, slurm

            for job, (cfg, out_dir) in zip(jobs, jobs_cfg, strict=True):
                if job.job_id not in states or first_word(states[job.job_id] or "") in _LIVE:
                    continue  # still in the queue (Ctrl-C and a slow scancel) or not yet in the accounts
                state = states[job.job_id]
                status = slurm.outcome(state, (record.read(out_dir) or {}).get("status"))
                if status is None:
                    continue  # the run wrote a final status itself
                message = slurm.outcome_message(
                    status,
                    job.job_id,
                    state,
                    params,
                    slurm.finished_tasks(out_dir),
                    started=out_dir.is_dir(),
                    log=str(job.paths.stderr),
                )
                try:
                    slurm.record_outcome(out_dir, cfg, status, message)
                    if not (out_dir / ".hydra" / "overrides.yaml").is_file():  # never started: Hydra wrote nothing
                        (out_dir / ".hydra").mkdir(parents=True, exist_ok=True)
                        OmegaConf.save(
                            OmegaConf.create(list(cfg.hydra.overrides.task)), out_dir / ".hydra" / "overrides.yaml"
                        )
                except Exception as e:  # noqa: BLE001 - one job's folder must not hide the others
                    print(f"cl-run: could not record {status} for job {job.job_id} in {out_dir}: {e}", file=sys.stderr)
                print(f"cl-run: job {job.job_id}: {status}: {message}", file=sys.stderr, flush=True)

    def _job_name(overrides, config) -> str:
        from cl_runner.slurm import job_name

        return job_name(overrides, OmegaConf.select(config, "method.name", default=None))

    def _singletons():
        from hydra.core.singleton import Singleton

        return Singleton.get_state()

    def _fail(message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
