"""Stacked training: the runs of a sweep group train in lockstep in one process, as one stacked model.

A *group* is a list of jobs whose configs are equal except on stackable keys (λ, seed, the method's
options, ``optimizer.lr``; see ``hydra_plugins/cl_runner_launcher/vectorized_launcher.py``). Each
member runs the ordinary job (``app.run_experiment`` through Hydra's ``run_job``: validation, its
folder, resume, loggers, results, failure rows) in a thread of its own, with the group's
:class:`~cl_runner.app.RunParts` (its trainer class and shared streams); the threads take turns (one
runs at a time, like coroutines) and each keeps its own global RNG state across turns, so
everything outside the training steps is the separate run's own code with the separate run's state.
When a member reaches the training of a task, its :class:`MemberTrainer` hands the task to the
:class:`Group` and waits; once every live member waits, the group trains the waiting members that
are at the same task together:

- each member draws its own batches from its own generator (seeded by its seed) and keeps its own
  model (own initialization), method object (own λ, options, importance, anchors) and optimizer;
- ``loop``: the members train the task one after another, each by the trainer's own loop (the same
  kernels as a separate run, so the accuracy matrices are **bitwise equal** to separate runs with
  ``threads=1``: a member's own thread computes on one CPU thread, while its training, its
  importance passes and its evaluations after each task run in the coordinator's thread on the jobs'
  ``threads``; what the group saves is the fixed costs around training); or ``vmap``: the parameters
  are stacked into tensors with a leading member dimension, step by step, and the forward pass is
  ``torch.func.vmap`` over ``functional_call`` (one batched matmul per layer; the member models'
  parameters become views of the stacked tensors, their ``.grad`` views of the stacked gradient, so
  the methods' hooks and the optimizer act on them unchanged; members that share a stream and a head
  take one gather and one cross-entropy call). Batched matmuls sum in another order than single
  ones: gradients differ in the last bits (≈1e-8 measured on CPU), which training can amplify;
  ``auto`` = ``vmap`` on a GPU, ``loop`` on the CPU;
- optimizer: with ``vmap``, one optimizer of the members' class over the stacked tensors (on the CPU
  its fused kernel when the class has one: Adam, AdamW, SGD), its state
  the members' states stacked (written back into each member's optimizer after the task, for
  checkpoints); Adam and SGD are elementwise, so this is one optimizer per member with no coupling.
  When the members' hyperparameters differ (a swept ``optimizer.lr``), each member's own optimizer
  steps its own parameters;
- the methods' hooks run per member (``training_batch``, ``loss``, ``after_backward``,
  ``add_penalty_grad``, ``after_step``, each with the member's own batch), exactly as
  ``Trainer._train_task`` calls them (keep the two in step when the hooks change);
- a member whose loss or penalty turns non-finite gets its :class:`~cl_runner.trainer.Diverged`
  (at the same step as a separate run would) and leaves the group; the others go on.

Memory: every member holds its own model, optimizer state and importance; the task stream is
shared by members with the same benchmark, scenario, seed and data options (a λ sweep holds one
stream, a seed sweep one per seed).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cl_runner.report.terminal import ConsoleLogger, Fanout
from cl_runner.trainer import Trainer as _Trainer

FORWARDS = ("auto", "loop", "vmap")


def stackable_method(cls: type) -> bool:
    """True only for method classes that declare ``stackable = True`` themselves (not inherited: a new
    subclass of a stackable method may add per-step behaviour the group does not know)."""
    return bool(vars(cls).get("stackable", False))


def vmap_ok(model: nn.Module) -> str | None:
    """Why ``model`` cannot take the vmap forward (None if it can): buffers (batch norm updates its
    running statistics in place) and active dropout (its random masks would differ from separate runs)."""
    if any(True for _ in model.buffers()):
        return "the model has buffers (batch norm)"
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return "the model uses dropout"
    return None


@dataclass
class _Request:
    trainer: Any  # MemberTrainer
    data: Any  # TrainingData
    optimizer: torch.optim.Optimizer
    n_steps: int
    device: torch.device
    t: int

    def key(self) -> tuple:
        shapes = tuple((n, tuple(p.shape)) for n, p in self.trainer.model.named_parameters())
        return (self.t, self.n_steps, str(self.device), type(self.trainer.model).__name__, shapes, len(self.data))


@dataclass
class _Call:
    """A member's request to run ``fn`` in the coordinator's thread (its importance pass and evaluation
    after a task): there it computes on the jobs' CPU threads, not the member thread's one."""

    fn: Callable[[], Any]

    def key(self) -> tuple:
        return ("call", id(self))


@dataclass
class _Member:
    index: int
    fn: Callable[[], Any]
    state: str = "runnable"  # runnable | waiting | done
    request: _Request | None = None
    response: Any = None
    result: Any = None
    error: BaseException | None = None
    rng: Tensor | None = None
    cuda_rng: list[Tensor] | None = None
    thread: threading.Thread | None = field(default=None, repr=False)


class Group:
    """Runs ``fns`` (one callable per member: the whole job) in lockstep; see the module docstring."""

    def __init__(self, forward: str = "auto", log: Callable[[str], None] | None = None, threads: int | None = None):
        if forward not in FORWARDS:
            raise ValueError(f"hydra.launcher.forward={forward!r} is not valid; choose one of: {', '.join(FORWARDS)}")
        self.forward = forward
        self.threads = threads  # the jobs' `threads`: the coordinator trains with them
        self.log = log or (lambda msg: None)
        self._cv = threading.Condition()
        self._turn: int | None = None  # the member that may run; None = the coordinator
        self._local = threading.local()
        self.members: list[_Member] = []
        self.interrupted = False
        self.trained_together = 0  # tasks trained by more than one member at once (tests)
        self._trainer_class = member_trainer_class(self)
        self._streams = stream_cache()  # members share one stream per benchmark config

    # ------------------------------------------------------------------ turns
    def _save_rng(self, m: _Member) -> None:
        m.rng = torch.get_rng_state()
        m.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def _load_rng(self, m: _Member) -> None:
        if m.rng is not None:
            torch.set_rng_state(m.rng)
        if m.cuda_rng is not None:
            torch.cuda.set_rng_state_all(m.cuda_rng)

    def _thread_main(self, m: _Member) -> None:
        from cl_runner.app import RunParts, using_parts

        self._local.member = m
        # The member's own thread computes on one CPU thread, from its first torch op on (the job's
        # validation builds a model): every OS thread that runs parallel torch ops keeps an OpenMP
        # team, and once the teams hold more threads than there are cores OpenMP stops spinning
        # between ops: the coordinator's training steps took 2-4x as long (measured on 2 cores)
        torch.set_num_threads(1)
        with self._cv:
            self._cv.wait_for(lambda: self._turn == m.index)
        try:
            # the member's job builds its trainer and stream through the group (ContextVars are per thread)
            parts = RunParts(build_stream=self._streams, trainer=self._trainer_class, threads=1)
            with using_parts(parts):
                m.result = m.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the launcher
            m.error = e
        finally:
            with self._cv:
                m.state = "done"
                self._turn = None
                self._cv.notify_all()

    def _give_turn(self, m: _Member) -> None:
        """Let member ``m`` run until it waits for training or finishes (the coordinator waits)."""
        with self._cv:
            self._turn = m.index
            self._cv.notify_all()
            while self._turn is not None:
                try:
                    self._cv.wait()
                except KeyboardInterrupt:  # Ctrl-C: the members stop at their next training request
                    self.interrupted = True

    def request(self, req: _Request | _Call) -> Any:
        """Called in a member's thread by :class:`MemberTrainer`: wait for the group to train this task
        (returns (losses, penalties)) or to run the call; raises what it raised for this member."""
        m: _Member = self._local.member
        with self._cv:
            m.request, m.state = req, "waiting"
            self._save_rng(m)
            self._turn = None
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._turn == m.index)
        self._load_rng(m)
        response, m.response, m.request = m.response, None, None
        if isinstance(response, BaseException):
            raise response
        return response

    # ------------------------------------------------------------------ the coordinator
    def run(self, fns: Sequence[Callable[[], Any]]) -> list[_Member]:
        """Run every member to its end; returns the members (``result`` or ``error`` each)."""
        self.members = [_Member(i, fn) for i, fn in enumerate(fns)]
        # the coordinator trains on the jobs' threads, set in its own thread before any member starts
        # (a thread that never set its count follows the last count set in any thread)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads or threads)
        for m in self.members:
            m.thread = threading.Thread(target=self._thread_main, args=(m,), name=f"member-{m.index}", daemon=True)
            m.thread.start()
        try:
            self._coordinate()
        finally:
            torch.set_num_threads(threads)
        for m in self.members:
            m.thread.join()
        return self.members

    def _coordinate(self) -> None:
        while True:
            for m in self.members:
                if m.state == "runnable":
                    self._give_turn(m)
            waiting = [m for m in self.members if m.state == "waiting"]
            if not waiting:
                break
            self._serve(waiting)

    def _serve(self, waiting: list[_Member]) -> None:
        parts: dict[tuple, list[_Member]] = {}
        for m in waiting:
            parts.setdefault(m.request.key(), []).append(m)
        for part in parts.values():
            if self.interrupted:
                responses: list[Any] = [KeyboardInterrupt()] * len(part)
            else:
                try:
                    if isinstance(part[0].request, _Call):  # one member's importance pass and evaluation
                        responses = [_as_member(self, part[0], part[0].request.fn)]
                    else:
                        responses = self._train(part)
                except KeyboardInterrupt:
                    self.interrupted = True
                    responses = [KeyboardInterrupt()] * len(part)
                except Exception as e:  # noqa: BLE001 - each member records it as its own failure
                    responses = [e] * len(part)
            for m, r in zip(part, responses, strict=True):
                m.response, m.state = r, "runnable"

    # ------------------------------------------------------------------ training together
    def _train(self, part: list[_Member]) -> list[Any]:
        reqs = [m.request for m in part]
        if len(reqs) == 1:  # nothing to stack: the trainer's own loop
            return [_own_train_task(reqs[0], self, part[0])]
        self.trained_together += 1
        forward = self.forward
        if forward == "auto":
            forward = "vmap" if reqs[0].device.type == "cuda" else "loop"
        if forward == "vmap":
            why = vmap_ok(reqs[0].trainer.model)
            if why:
                self.log(f"vectorized: {why}: members train this task one after another (forward=loop)")
                forward = "loop"
        if forward == "loop":
            # each member's whole task after the other's, by the trainer's own loop: the separate runs'
            # kernels, and one model's parameters and optimizer state stay in the CPU's caches (stepping
            # 16 members in turn, every step evicted the others' state: 1.7× the basic launcher's time)
            return [_own_train_task(r, self, m) for r, m in zip(reqs, part, strict=True)]
        return _train_together(reqs)


def _as_member(group: Group, m: _Member, fn: Callable[[], Any]) -> Any:
    """``fn()`` in the coordinator's thread with member ``m``'s global RNG state (saved back after);
    an exception it raises (Diverged and the like) is returned, for the member to raise."""
    group._load_rng(m)
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - handed back to the member
        return e
    finally:
        group._save_rng(m)


def _own_train_task(r: _Request, group: Group, m: _Member) -> Any:
    """A member alone at its task: the trainer's own loop."""
    return _as_member(group, m, lambda: _Trainer._train_task(r.trainer, r.data, r.optimizer, r.n_steps, r.device, r.t))


def _epochs(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[Tensor]:
    """The trainer's batch order: one seeded permutation per epoch, drawn when the epoch starts."""
    from cl_runner.data.stream import batch_indices

    while True:
        yield from batch_indices(n, batch_size, generator, device)


def _stacked_optimizer(
    reqs: list[_Request], names: list[str], own: list[list[Tensor]], stacked: dict[str, Tensor]
) -> torch.optim.Optimizer | None:
    """One optimizer over the stacked tensors that continues the members' own optimizers (their
    state stacked along the member dimension), or None when they differ (class, hyperparameters such
    as a swept lr, state present in some only): then each member's optimizer steps its views."""
    opts = [r.optimizer for r in reqs]
    if len({type(o) for o in opts}) != 1 or any(len(o.param_groups) != 1 for o in opts):
        return None
    hyper = [{k: v for k, v in o.param_groups[0].items() if k != "params"} for o in opts]
    if any(h != hyper[0] for h in hyper[1:]):
        return None
    tensors = [stacked[n] for n in names]
    opt = None
    if "fused" in hyper[0] and tensors[0].device.type == "cpu":
        # Adam, AdamW, SGD: the fused CPU kernel, one pass over each stacked tensor; the per-tensor
        # kernels streamed the 16 members' moments from memory several times per step (16-member
        # Adam on the default MLP: 1.5 ms fused, 11 ms per-tensor, 7.5 ms as 16 own optimizers; measured)
        with contextlib.suppress(RuntimeError, ValueError):  # e.g. differentiable=True: the plain class
            opt = type(opts[0])(tensors, **{**hyper[0], "fused": True, "foreach": None})
    if opt is None:
        opt = type(opts[0])(tensors, **hyper[0])
    states = [[o.state.get(p) for p in params] for o, params in zip(opts, own, strict=True)]
    for i, name in enumerate(names):
        per = [st[i] for st in states]
        if all(x is None or not x for x in per):
            continue
        if any(x is None or not x for x in per) or any(x.keys() != per[0].keys() for x in per):
            return None
        merged = {}
        for key, v in per[0].items():
            if torch.is_tensor(v) and v.shape == own[0][i].shape and v.dim() > 0:
                merged[key] = torch.stack([x[key] for x in per])
            elif all(torch.equal(torch.as_tensor(x[key]), torch.as_tensor(v)) for x in per):  # e.g. Adam's step
                merged[key] = v.clone() if torch.is_tensor(v) else v
            else:
                return None
        opt.state[stacked[name]] = merged
    return opt


def _unstack_optimizer(opt: torch.optim.Optimizer, reqs: list[_Request], names: list[str], own) -> None:
    """Write the stacked optimizer's state back into each member's own optimizer (checkpoints, the
    next task)."""
    for k, r in enumerate(reqs):
        for i, t in enumerate(opt.param_groups[0]["params"]):
            state = opt.state.get(t)
            if not state:
                continue
            r.optimizer.state[own[k][i]] = {
                key: (
                    v[k].clone()
                    if torch.is_tensor(v) and v.dim() > 0 and v.shape == t.shape
                    else v.clone()
                    if torch.is_tensor(v)
                    else v
                )
                for key, v in state.items()
            }


def _train_together(reqs: list[_Request]) -> list[Any]:
    """Train one task for every member of ``reqs`` (same task, same number of steps) step by step, as
    one stacked model (``forward=vmap``). Returns per member (losses, penalties) as
    ``Trainer._train_task`` does, or its exception."""
    import torch.nn.functional as F
    from torch.func import functional_call, vmap

    from cl_runner.methods.base import Batch
    from cl_runner.trainer import Diverged

    n, n_steps, device = len(reqs), reqs[0].n_steps, reqs[0].device
    trainers = [r.trainer for r in reqs]
    models = [tr.model for tr in trainers]
    batches = [_epochs(len(r.data), tr.batch_size, tr.generator, device) for r, tr in zip(reqs, trainers, strict=True)]
    losses = [torch.zeros(n_steps, device=device) for _ in reqs]
    penalties = [torch.zeros(n_steps, device=device) for _ in reqs]
    responses: list[Any] = [None] * n
    alive = list(range(n))
    for model in models:
        model.train()

    names = [name for name, p in models[0].named_parameters() if p.requires_grad]
    with torch.no_grad():
        stacked = {name: torch.stack([dict(m.named_parameters())[name] for m in models]) for name in names}
    for t in stacked.values():
        t.requires_grad_(True)
    own = [[dict(m.named_parameters())[name] for name in names] for m in models]
    for k, params in enumerate(own):  # the members' parameters become views of the stacked tensors
        for name, p in zip(names, params, strict=True):
            p.data = stacked[name].detach()[k]
    base = models[0]
    optimizer = _stacked_optimizer(reqs, names, own, stacked)

    def one(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(base, params, (x,))

    batched = vmap(one)

    shared = all(r.data.x is reqs[0].data.x and r.data.y is reqs[0].data.y for r in reqs)
    one_head = all(r.data.sample_units is None and r.data.units == reqs[0].data.units for r in reqs)
    checked = 0
    for step in range(n_steps):
        idx = [next(b) for b in batches]
        data = [r.data for r in reqs]
        units = [None if d.sample_units is None else d.sample_units[i] for d, i in zip(data, idx, strict=True)]
        for t in stacked.values():
            t.grad = None
        if shared:  # one stream for all (a λ sweep): one gather
            rows = torch.stack(idx)
            x, y = data[0].x[rows], data[0].y[rows]
        else:
            x = torch.stack([d.x[i] for d, i in zip(data, idx, strict=True)])
            y = torch.stack([d.y[i] for d, i in zip(data, idx, strict=True)])
        given = {k: Batch(x[k], y[k], data[k].units, units[k], reqs[k].t) for k in alive}
        batch = {k: trainers[k].method.training_batch(b) for k, b in given.items()}
        if any(batch[k] is not given[k] for k in alive):  # a method changed its batch: stack what it gave
            x = torch.stack([batch[k].x if k in batch else x[k] for k in range(n)])
            y = torch.stack([batch[k].y if k in batch else y[k] for k in range(n)])
        logits = batched(stacked, x)
        plain = one_head and all(batch[k] is given[k] for k in alive)
        if plain:  # every member's cross-entropy in one call: mean over each member's batch
            lo, hi = data[0].units
            per = F.cross_entropy(logits[:, :, lo:hi].flatten(0, 1), (y - lo).flatten(), reduction="none")
            per = per.view(n, -1).mean(1)
            step_losses = {k: per[k] for k in alive}
        else:
            step_losses = {k: trainers[k].method.task_loss(batch[k], logits[k]) for k in alive}
        for k in alive:
            extra = trainers[k].method.loss(batch[k], logits[k])
            if extra is not None:
                step_losses[k] = step_losses[k] + extra
        sum(step_losses.values()).backward()
        for k in alive:
            for name, p in zip(names, own[k], strict=True):
                p.grad = stacked[name].grad[k]
        for k in alive:  # the rest of Trainer._train_task's step, per member
            penalty = trainers[k]._gradient_hooks(batch[k])
            if penalty is not None:
                penalties[k][step] = penalty
            if optimizer is None:
                reqs[k].optimizer.step()
        if optimizer is not None:  # a diverged member's slice moves on unused (nothing reads it again)
            optimizer.step()
        for k in alive:
            trainers[k].method.after_step(models[k], batch[k])
            losses[k][step] = step_losses[k].detach()
        done = step + 1
        if done % trainers[0].progress_every == 0 or done == n_steps:
            for k in list(alive):
                try:
                    trainers[k]._check_finite(losses[k], penalties[k], checked, done, reqs[k].t)
                except Diverged as e:
                    responses[k] = e
                    alive.remove(k)
                    continue
                trainers[k].events.progress(reqs[k].t, done, float(losses[k][done - 1]))
            checked = done
            if not alive:
                break
    if optimizer is not None:
        _unstack_optimizer(optimizer, reqs, names, own)
    for k in alive:
        responses[k] = (losses[k].tolist(), penalties[k].tolist())
    return responses


class _Quiet(Fanout):
    """A member's trainer events without the console's progress bars (several members would draw
    several live bars at once); the group prints one line per task instead."""

    def __init__(self, events: Any):
        targets = events.targets if isinstance(events, Fanout) else (events,)
        super().__init__(*targets)
        self.loud = Fanout(*[x for x in targets if not isinstance(x, ConsoleLogger)])

    def task_start(self, *args) -> None:
        self.loud.task_start(*args)

    def progress(self, *args) -> None:
        self.loud.progress(*args)

    def task_end(self, *args) -> None:
        self.loud.task_end(*args)


def member_trainer_class(group: Group) -> type:
    """``cl_runner.trainer.Trainer`` whose task training is done by ``group``."""

    class MemberTrainer(_Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.events = _Quiet(self.events)

        def _train_task(self, data, optimizer, n_steps, device, t):
            return group.request(_Request(self, data, optimizer, n_steps, device, t))

        def _importance_and_row(self, t):
            # the member's thread computes on one CPU thread (see Group._thread_main); its importance pass
            # and evaluation run in the coordinator's thread, on the jobs' threads (a 4-member EWC sweep on
            # permuted MNIST: 45 s instead of 51 s, measured on 2 cores)
            return group.request(_Call(lambda: _Trainer._importance_and_row(self, t)))

        def state_dict(self) -> dict[str, Any]:
            state = super().state_dict()
            # with forward=vmap the parameters are views of the group's stacked tensors: save copies
            # (torch.save would write the whole stacked storage)
            state["model"] = {k: v.clone() for k, v in state["model"].items()}
            return state

    return MemberTrainer


def stream_cache() -> Callable:
    """``build_stream`` that returns the same stream for the same arguments (members share it)."""
    from omegaconf import OmegaConf

    from cl_runner.data import benchmarks

    build, cache = benchmarks.build_stream, {}

    def cached(cfg, scenario, seed, device, data_dir, download=True, active_units="seen"):
        plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        key = (repr(sorted(plain.items(), key=str)), scenario, int(seed), str(device), str(data_dir), bool(download))
        key += (active_units,)
        if key not in cache:
            cache[key] = build(cfg, scenario, seed, device, data_dir, download, active_units)
        return cache[key]

    return cached
