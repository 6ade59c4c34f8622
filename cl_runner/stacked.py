"""Stacked training: the runs of a sweep group train in one process, in one loop, without threads.

A *group* is a list of jobs whose configs are equal except on stackable keys (λ, seed, the method's
options, ``optimizer.lr``; see ``hydra_plugins/cl_runner_launcher/vectorized_launcher.py``). Each
member is an ordinary run (``cl_runner.run.run_phases`` through Hydra's ``run_job``: validation, its
folder, resume, loggers, results, failure rows), opened by the launcher and handed over as its
*phases*: a generator that does everything around training and yields a
:class:`~cl_runner.trainer.TaskTraining` request for each task's training. :meth:`Group.run`
advances every member's phases in turn, each with its own global RNG state (loaded before, saved
after), so everything outside the training steps is the separate run's own code with the separate
run's state; it trains the requests of members that are at the same task together and sends each
member its answer (or throws its exception, e.g. :class:`~cl_runner.trainer.Diverged`, into its
phases, where the run records it). Why no threads: a generator is a run paused between phases, which
is all a group needs; threads taking turns did the same with locks and a global-RNG swap per turn.

- each member draws its own batches from its own generator (seeded by its seed) and keeps its own
  model (own initialization), method object (own λ, options, importance, anchors) and optimizer;
- ``loop``: the members train the task one after another, each by the trainer's own loop (the same
  kernels as a separate run: the accuracy matrices are **bitwise equal** to separate runs); or
  ``vmap``: the parameters are stacked into tensors with a leading member dimension, step by step, and
  the forward pass is ``torch.func.vmap`` over ``functional_call`` (one batched matmul per layer; the
  member models' parameters become views of the stacked tensors, their ``.grad`` views of the stacked
  gradient, so the step's hooks (:class:`~cl_runner.step.TrainingStep`: the method's gradient hooks,
  clipping, after-step) and the optimizer act on them unchanged; members that share a stream and a head
  take one gather and one cross-entropy call). Batched matmuls sum in another order than single
  ones: gradients differ in the last bits (≈1e-8 measured on CPU), which training can amplify;
  ``auto`` = ``vmap`` on a GPU, ``loop`` on the CPU;
- optimizer: with ``vmap``, one optimizer of the members' class over the stacked tensors (on the CPU
  its fused kernel when the class has one: Adam, AdamW, SGD), its state the members' states stacked
  (written back into each member's optimizer after the task, for checkpoints); Adam and SGD are
  elementwise, so this is one optimizer per member with no coupling. When the members'
  hyperparameters differ (a swept ``optimizer.lr``), each member's own optimizer steps its own
  parameters;
- a member whose loss or penalty turns non-finite gets its :class:`~cl_runner.trainer.Diverged`
  (at the same step as a separate run would) and leaves the group; the others go on.

Memory: every member holds its own model, optimizer state and importance; the task stream is
shared by members with the same benchmark, scenario, seed and data options (a λ sweep holds one
stream, a seed sweep one per seed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cl_runner.methods.base import Method
from cl_runner.trainer import Diverged, Phases, TaskTraining, Trainer

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
class Member:
    """One run of the group: its phases, the request it waits on (None once it ended), its result
    (the record) or the exception it ended with, and its global RNG state between its turns."""

    index: int
    phases: Phases | None
    request: TaskTraining | None = None
    result: Any = None
    error: BaseException | None = None
    rng: Tensor | None = None
    cuda_rng: list[Tensor] | None = None
    threads: int | None = None  # its CPU threads (a run sets its own while it is open)

    def key(self) -> tuple:
        r = self.request
        model = r.trainer.model
        shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
        device = str(next(model.parameters()).device)
        return (r.t, r.n_steps, device, type(model).__name__, shapes, len(r.data))


class Group:
    """Advances its members' phases in one loop and trains their tasks together (module docstring)."""

    def __init__(self, forward: str = "auto", log: Callable[[str], None] | None = None):
        if forward not in FORWARDS:
            raise ValueError(f"hydra.launcher.forward={forward!r} is not valid; choose one of: {', '.join(FORWARDS)}")
        self.forward = forward
        self.log = log or (lambda msg: None)
        self.members: list[Member] = []
        self.interrupted = False
        self.trained_together = 0  # tasks trained by more than one member at once (tests)

    def add(self, phases: Phases | None, first: Any) -> Member:
        """A member whose phases were just opened and advanced to their ``first`` request (a
        :class:`TaskTraining`; anything else is the run's result: it has nothing left to train). Call
        it right after opening the run: the global RNG is the member's own at that moment."""
        m = Member(len(self.members), phases)
        if isinstance(first, TaskTraining):
            m.request = first
        else:
            m.result = first
        self._save_rng(m)
        self.members.append(m)
        return m

    # ------------------------------------------------------------------ each member's own process state
    def _save_rng(self, m: Member) -> None:
        """The process-wide state a run keeps between its phases: the global RNGs, the CPU threads."""
        m.rng = torch.get_rng_state()
        m.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        m.threads = torch.get_num_threads()

    def _load_rng(self, m: Member) -> None:
        if m.rng is not None:
            torch.set_rng_state(m.rng)
        if m.cuda_rng is not None:
            torch.cuda.set_rng_state_all(m.cuda_rng)
        if m.threads is not None and m.threads != torch.get_num_threads():
            torch.set_num_threads(m.threads)

    @contextlib.contextmanager
    def _as(self, m: Member) -> Iterator[None]:
        self._load_rng(m)
        try:
            yield
        finally:
            self._save_rng(m)

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[Member]:
        """Advance every member to its end; returns the members (``result`` or ``error`` each)."""
        while True:
            waiting = [m for m in self.members if m.request is not None]
            if not waiting:
                return self.members
            parts: dict[tuple, list[Member]] = {}
            for m in waiting:
                parts.setdefault(m.key(), []).append(m)
            for part in parts.values():
                answers = [KeyboardInterrupt()] * len(part) if self.interrupted else self._train(part)
                for m, answer in zip(part, answers, strict=True):
                    self._advance(m, answer)

    def _advance(self, m: Member, answer: Any) -> None:
        """Send ``answer`` (or throw it, an exception) into member ``m``'s phases: they run to the next
        request, or to their end."""
        with self._as(m):
            try:
                if isinstance(answer, BaseException):
                    m.request = m.phases.throw(answer)
                else:
                    m.request = m.phases.send(answer)
            except StopIteration as stop:
                m.request, m.result = None, stop.value
            except BaseException as e:  # noqa: BLE001 - the member's outcome, for the launcher
                m.request, m.error = None, e
                if isinstance(e, KeyboardInterrupt) or getattr(e, "status", None) == "interrupted":
                    self.interrupted = True

    # ------------------------------------------------------------------ training together
    def _own(self, m: Member) -> Any:
        """Member ``m`` alone at its task: the trainer's own loop (its answer, or its exception)."""
        with self._as(m):
            try:
                return m.request.trainer.train_task(m.request)
            except KeyboardInterrupt as e:
                self.interrupted = True
                return e
            except Exception as e:  # noqa: BLE001 - handed back to the member
                return e

    def _train(self, part: list[Member]) -> list[Any]:
        if len(part) == 1:  # nothing to stack
            return [self._own(part[0])]
        self.trained_together += 1
        forward = self.forward
        if forward == "auto":
            forward = "vmap" if next(part[0].request.trainer.model.parameters()).is_cuda else "loop"
        if forward == "vmap":
            why = vmap_ok(part[0].request.trainer.model)
            if why:
                self.log(f"vectorized: {why}: members train this task one after another (forward=loop)")
                forward = "loop"
        if forward == "loop":
            # each member's whole task after the other's, by the trainer's own loop: the separate runs'
            # kernels, and one model's parameters and optimizer state stay in the CPU's caches (stepping
            # 16 members in turn, every step evicted the others' state: 1.7× the basic launcher's time)
            return [self._own(m) for m in part]
        try:
            return _train_together([m.request for m in part])
        except KeyboardInterrupt as e:
            self.interrupted = True
            return [e] * len(part)
        except Exception as e:  # noqa: BLE001 - each member records it as its own failure
            return [e] * len(part)


def _epochs(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[Tensor]:
    """The trainer's batch order: one seeded permutation per epoch, drawn when the epoch starts."""
    from cl_runner.data.stream import batch_indices

    while True:
        yield from batch_indices(n, batch_size, generator, device)


def _stacked_optimizer(
    reqs: list[TaskTraining], names: list[str], own: list[list[Tensor]], stacked: dict[str, Tensor]
) -> torch.optim.Optimizer | None:
    """One optimizer over the stacked tensors that continues the members' own optimizers (their
    state stacked along the member dimension), or None when they differ (class, hyperparameters such
    as a swept lr, state present in some only): then each member's optimizer steps its views."""
    opts = [r.trainer.optimizer for r in reqs]
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


def _unstack_optimizer(opt: torch.optim.Optimizer, reqs: list[TaskTraining], names: list[str], own) -> None:
    """Write the stacked optimizer's state back into each member's own optimizer (checkpoints, the
    next task)."""
    for k, r in enumerate(reqs):
        for i, t in enumerate(opt.param_groups[0]["params"]):
            state = opt.state.get(t)
            if not state:
                continue
            r.trainer.optimizer.state[own[k][i]] = {
                key: (
                    v[k].clone()
                    if torch.is_tensor(v) and v.dim() > 0 and v.shape == t.shape
                    else v.clone()
                    if torch.is_tensor(v)
                    else v
                )
                for key, v in state.items()
            }


def _train_together(reqs: list[TaskTraining]) -> list[Any]:
    """Train one task for every member of ``reqs`` (same task, same number of steps) step by step, as
    one stacked model (``forward=vmap``). Returns per member (losses, penalties) as
    :meth:`Trainer.train_task` does, or its exception."""
    return _StackedTask(reqs).run()


class _StackedTask:
    """One task of a ``vmap`` group: the members' parameters stacked (their own parameters become
    views of the stacked tensors), one forward/backward for all, each member's step hooks on its views."""

    def __init__(self, reqs: list[TaskTraining]):
        from torch.func import functional_call, vmap

        self.reqs, self.n, self.n_steps = reqs, len(reqs), reqs[0].n_steps
        self.trainers = [r.trainer for r in reqs]
        models = [tr.model for tr in self.trainers]
        self.device = next(models[0].parameters()).device
        self.batches = [_epochs(len(r.data), r.trainer.batch_size, r.trainer.generator, self.device) for r in reqs]
        self.losses = [torch.zeros(self.n_steps, device=self.device) for _ in reqs]
        self.penalties = [torch.zeros(self.n_steps, device=self.device) for _ in reqs]
        self.responses: list[Any] = [None] * self.n
        self.alive = list(range(self.n))
        for model in models:
            model.train()
        self.names = [name for name, p in models[0].named_parameters() if p.requires_grad]
        with torch.no_grad():
            self.stacked = {n: torch.stack([dict(m.named_parameters())[n] for m in models]) for n in self.names}
        for t in self.stacked.values():
            t.requires_grad_(True)
        self.own = [[dict(m.named_parameters())[name] for name in self.names] for m in models]
        for k, params in enumerate(self.own):  # the members' parameters become views of the stacked tensors
            for name, p in zip(self.names, params, strict=True):
                p.data = self.stacked[name].detach()[k]
        self.optimizer = _stacked_optimizer(reqs, self.names, self.own, self.stacked)
        base = models[0]
        self.forward = vmap(lambda params, x: functional_call(base, params, (x,)))
        self.shared = all(r.data.x is reqs[0].data.x and r.data.y is reqs[0].data.y for r in reqs)
        self.one_head = all(r.data.sample_units is None and r.data.units == reqs[0].data.units for r in reqs)
        # the task losses of all members in one cross-entropy call: only for methods that keep the default
        self.default_loss = all(type(tr.method).task_loss is Method.task_loss for tr in self.trainers)

    def run(self) -> list[Any]:
        checked = 0
        for step in range(self.n_steps):
            self._step(step)
            done = step + 1
            if done % self.trainers[0].progress_every == 0 or done == self.n_steps:
                self._check(checked, done)
                checked = done
                if not self.alive:
                    break
        if self.optimizer is not None:
            _unstack_optimizer(self.optimizer, self.reqs, self.names, self.own)
        for params in self.own:  # each member's own storage again (a checkpoint saves only its own parameters)
            for p in params:
                p.data = p.data.clone()
                p.grad = None if p.grad is None else p.grad.clone()
        for k in self.alive:
            self.responses[k] = (self.losses[k].tolist(), self.penalties[k].tolist())
        return self.responses

    def _draw(self) -> tuple[dict[int, Any], dict[int, Any], Tensor, Tensor]:
        """Each member's drawn batch and the batch its method trains on; the stacked inputs and labels."""
        from cl_runner.methods.base import Batch

        idx = [next(b) for b in self.batches]
        data = [r.data for r in self.reqs]
        units = [None if d.sample_units is None else d.sample_units[i] for d, i in zip(data, idx, strict=True)]
        if self.shared:  # one stream for all (a λ sweep): one gather
            rows = torch.stack(idx)
            x, y = data[0].x[rows], data[0].y[rows]
        else:
            x = torch.stack([d.x[i] for d, i in zip(data, idx, strict=True)])
            y = torch.stack([d.y[i] for d, i in zip(data, idx, strict=True)])
        given = {k: Batch(x[k], y[k], data[k].units, units[k], self.reqs[k].t) for k in self.alive}
        batch = {k: self.trainers[k].step.prepare(b) for k, b in given.items()}
        if any(batch[k] is not given[k] for k in self.alive):  # a method changed its batch: stack what it gave
            x = torch.stack([batch[k].x if k in batch else x[k] for k in range(self.n)])
            y = torch.stack([batch[k].y if k in batch else y[k] for k in range(self.n)])
        return given, batch, x, y

    def _loss(self, given: dict, batch: dict, logits: Tensor, y: Tensor) -> dict[int, Tensor]:
        import torch.nn.functional as F

        if not (self.default_loss and self.one_head and all(batch[k] is given[k] for k in self.alive)):
            return {k: self.trainers[k].step.loss(batch[k], logits[k]) for k in self.alive}
        lo, hi = self.reqs[0].data.units  # every member's cross-entropy in one call: mean over each member's batch
        per = F.cross_entropy(logits[:, :, lo:hi].flatten(0, 1), (y - lo).flatten(), reduction="none")
        per = per.view(self.n, -1).mean(1)
        losses = {k: per[k] for k in self.alive}
        for k in self.alive:
            extra = self.trainers[k].method.loss(batch[k], logits[k])
            if extra is not None:
                losses[k] = losses[k] + extra
        return losses

    def _step(self, step: int) -> None:
        for t in self.stacked.values():
            t.grad = None
        given, batch, x, y = self._draw()
        step_losses = self._loss(given, batch, self.forward(self.stacked, x), y)
        sum(step_losses.values()).backward()
        for k in self.alive:
            for name, p in zip(self.names, self.own[k], strict=True):
                p.grad = self.stacked[name].grad[k]
        for k in self.alive:  # the rest of the step, per member
            penalty = self.trainers[k].step.gradient_hooks(batch[k])
            if penalty is not None:
                self.penalties[k][step] = penalty
            if self.optimizer is None:
                self.trainers[k].optimizer.step()
        if self.optimizer is not None:  # a diverged member's slice moves on unused (nothing reads it again)
            self.optimizer.step()
        for k in self.alive:
            self.trainers[k].step.after_step(batch[k])
            self.losses[k][step] = step_losses[k].detach()

    def _check(self, checked: int, done: int) -> None:
        """The steps since the last check: a member whose loss or penalty is not finite leaves the group."""
        for k in list(self.alive):
            try:
                Trainer.check_finite(self.losses[k], self.penalties[k], checked, done, self.reqs[k].t)
            except Diverged as e:
                self.responses[k] = e
                self.alive.remove(k)
                continue
            self.trainers[k].events.progress(self.reqs[k].t, done, float(self.losses[k][done - 1]))


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
