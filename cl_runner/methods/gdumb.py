"""GDumb (Prabhu et al. 2020, "GDumb: A Simple Approach that Questions Our Progress in Continual
Learning"): a greedy class-balanced memory of the stream, and before each evaluation a model trained
from scratch on that memory alone,

    θ_t = argmin_θ  Σ_{(x, y) ∈ M_t} CE(f_θ(x), y)     (from θ_0, by SGD),    M_t = sampler(stream up to t)

The accuracy matrix's row t is measured with f_{θ_t} (the ``evaluator`` hook). The run's own model
is never trained: ``training_data`` hands the trainer nothing (zero steps per task; ``epochs``,
``iterations`` and the run's optimizer do nothing), and the sampler takes the task's samples in a
random order from the method's generator, each once (the paper's stream is one pass; mammoth forces
``n_epochs = 1``).

Sampler (:class:`~cl_runner.methods.memory.BalancedMemory`, the paper's greedy sampler): a sample of
class y is kept when the memory holds fewer than ⌊k / |Y|⌋ of y (|Y| the classes seen so far), in a
free slot or in place of a random instance of the largest class; classes are output units (in
domain-IL the shared head's labels). ``buffer_size`` (k) must be at least the number of output units.

Learner (the authors' code, drimpossible/GDumb ``src/main.py``, ``src/opts.py``; the MNIST values of
``scripts/replicate.sh`` as defaults): θ_0 = the run model's initial weights (the parameters and
buffers it had before task 1, kept in the checkpoint), SGD with momentum 0.9 and weight decay 1e-6,
``fit_epochs`` passes (MNIST: 128) over the memory in batches of ``fit_batch`` (16), reshuffled
each pass, gradient norm clipped at ``clip_grad_norm`` (10); ``schedule: sgdr``: one warm-up pass
at 0.1 · ``max_lr``, one at ``max_lr`` (0.05), then cosine annealing with warm restarts (SGDR, T_0 = 1
pass, T_mult = 2, down to ``min_lr`` 0.0005), as the code steps it once per pass; ``schedule:
constant``: ``max_lr`` throughout. The loss: each memory sample's cross-entropy over the units that
test its task after task t (``stream.eval_units``: every unit with ``active_units=all``, the
authors' and mammoth's whole head; every seen class with the seen-class mask).

Where the codes differ and what is followed:

- the authors' code selects the memory offline (the first ⌊k / n_classes⌋ samples of each class of
  the whole dataset, ``src/dataloader.py``) and trains once, at the end; mammoth (models/gdumb.py,
  2022 onwards; not in the DER paper's commit) uses a reservoir memory and trains only after the
  last task, so its earlier rows test the untrained model. cl-runner follows the paper: the greedy
  class-balanced sampler online, a model trained from scratch before every evaluation.
- the authors report the best test accuracy over the passes (model selection on the test set);
  cl-runner tests the model after the last pass.
- the authors' data and model, not method options: MNIST normalized by mean/std, random crops
  (padding 4) in training, an MLP whose hidden layers are Linear (no bias) + BatchNorm + ReLU
  (``model=mlp model.batch_norm=true model.hidden=[400,400]`` is the closest), fp16 weights; cutmix
  only for the non-MNIST benchmarks.
- with batch norm in the model, a pass's last batch of a single sample is left out (it cannot be
  trained in train mode; the authors' memory sizes never leave one).

The fit draws its shuffles from a generator seeded from the run's seed and the task, and anything the
model draws itself (dropout) from the global RNG re-seeded the same way inside ``fork_rng``: the fit
is a function of the memory, the seed and t, and leaves the global RNG, the run's model and its
optimizer as they were. The trained model is kept until the memory changes (a second evaluation
of the same memory reuses it; with zero training steps, ``eval_every: epoch`` adds no evaluations).
No strength: ``lambda`` is refused.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cl_runner.data.stream import TaskStream
from cl_runner.methods.base import Method, TrainingData, cross_entropy
from cl_runner.methods.checks import check_choice, check_count
from cl_runner.methods.memory import BalancedMemory
from cl_runner.options import Float, check
from cl_runner.seeding import task_generator

#: ``task_generator`` ids: the sampler's stream order, and each evaluation's fit (+ the task index)
GDUMB_STREAM = (1 << 20) + 48
GDUMB_FIT = (1 << 21) + 48
#: samples offered to the sampler at once (bounds its temporary tensors; the result does not depend on it
#: beyond which keys the draws give)
CHUNK = 8192
SCHEDULES = ("sgdr", "constant")


@contextlib.contextmanager
def own_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG (CPU, and ``device``'s when it is a GPU) seeded with ``seed`` inside, restored
    afterwards: what a model draws itself (dropout) is reproducible and leaves the run's draws alone."""
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def sgdr_epoch(opt: torch.optim.Optimizer, sched: Any, epoch: int, max_lr: float) -> None:
    """The learning rate of pass ``epoch`` as drimpossible/GDumb src/main.py sets it, line for line:
    pass 0 at 0.1 · max_lr, pass 1 at max_lr, then one step of the SGDR scheduler per pass."""
    if epoch == 0:
        for group in opt.param_groups:
            group["lr"] = max_lr * 0.1
    elif epoch == 1:
        for group in opt.param_groups:
            group["lr"] = max_lr
    else:
        sched.step()


class GDumb(Method):
    name = "gdumb"
    uses_strength = False

    def __init__(
        self,
        strength: float,
        buffer_size: int,
        fit_epochs: int,
        fit_batch: int,
        max_lr: float,
        min_lr: float,
        momentum: float,
        weight_decay: float,
        clip_grad_norm: float | None,
        schedule: str,
    ):
        super().__init__(strength)
        self.buffer_size = check_count("buffer_size", buffer_size)
        self.fit_epochs = check_count("fit_epochs", fit_epochs)
        self.fit_batch = check_count("fit_batch", fit_batch)
        self.max_lr = float(check("method.max_lr", max_lr, Float(lo=0.0, lo_open=True)))
        self.min_lr = float(check("method.min_lr", min_lr, Float(lo=0.0)))
        self.momentum = float(check("method.momentum", momentum, Float(lo=0.0, hi=1.0, hi_open=True)))
        self.weight_decay = float(check("method.weight_decay", weight_decay, Float(lo=0.0)))
        self.clip_grad_norm = check(
            "method.clip_grad_norm", clip_grad_norm, Float(lo=0.0, lo_open=True, optional=True, null_means="none")
        )
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        if self.min_lr > self.max_lr:
            raise ValueError(f"method.min_lr={self.min_lr:g} must not exceed method.max_lr={self.max_lr:g}")
        self.buffer = BalancedMemory(self.buffer_size, 0)  # sized for the stream's units in setup
        self.generator = torch.Generator()
        self.initial: dict[str, Tensor] = {}  # θ_0: the run model's state before task 1
        self._template: nn.Module | None = None
        self._fitted: tuple[tuple[int, int], nn.Module] | None = None  # ((t, samples offered), model)
        self._offered = 0

    def setup(self, model: nn.Module, stream: TaskStream, seed: int = 0) -> None:
        super().setup(model, stream, seed)
        if stream is not None and self.buffer_size < stream.n_outputs:
            raise ValueError(
                f"method.buffer_size={self.buffer_size} is smaller than the stream's {stream.n_outputs} output units: "
                "GDumb's class-balanced memory needs at least one slot per class"
            )
        self.buffer = BalancedMemory(self.buffer_size, stream.n_outputs if stream is not None else 0)
        self.generator = task_generator(self.seed, GDUMB_STREAM)
        self._fitted, self._offered = None, 0
        if model is not None:
            self._template = copy.deepcopy(model)
            self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.buffer.state_dict(),
            "generator": self.generator.get_state(),
            "initial": dict(self.initial),
            "offered": self._offered,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer.load_state_dict(state)
        self.generator.set_state(state["generator"].cpu())  # a CPU generator, whatever the map_location
        self.initial = dict(state["initial"])
        self._offered = int(state["offered"])
        self._fitted = None

    # ------------------------------------------------------------------ the stream: into the memory only
    def training_data(self, stream: TaskStream, t: int) -> TrainingData:
        """Offers task t's samples to the sampler (a random order, each once); the trainer gets none."""
        task = stream[t]
        order = torch.randperm(task.n_train, generator=self.generator).to(task.x_train.device)
        for idx in order.split(CHUNK):
            self.buffer.add(self.generator, task.x_train[idx], task.y_train[idx], t)
        self._offered += task.n_train
        return TrainingData(task.x_train[:0], task.y_train[:0], task.units)

    # ------------------------------------------------------------------ evaluation: a model fitted on the memory
    def evaluator(self, model: nn.Module, trained: int) -> nn.Module:
        key = (trained, self._offered)
        if self._fitted is None or self._fitted[0] != key:
            self._fitted = (key, self.fit(trained))
        return self._fitted[1]

    def fit(self, trained: int) -> nn.Module:
        """A copy of the run's model, from its initial weights, trained on the memory (see the module
        docstring); the run's model, its optimizer and the global RNG are not touched."""
        if self._template is None:
            raise ValueError("gdumb needs the run's model in setup (its initial weights are the fit's start)")
        net = copy.deepcopy(self._template)
        net.load_state_dict(self.initial)
        net.train()
        n = len(self.buffer)
        mem = self.buffer.tensors
        if n == 0:
            return net
        x, y, task = mem["x"][:n], mem["y"][:n], mem["task"][:n]
        units = torch.tensor([self.stream.eval_units(trained, j) for j in range(len(self.stream))], device=y.device)
        sample_units = units[task]
        shared = bool((sample_units == sample_units[0]).all())
        lo_hi = tuple(int(u) for u in sample_units[0]) if shared else None
        device = x.device
        # batch norm cannot train on one sample: a last batch of one is left out of that pass
        single_ok = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        gen = task_generator(self.seed, GDUMB_FIT + trained)
        with own_global_rng(int(torch.randint(0, 2**62, (1,), generator=gen)), device):
            params = [p for p in net.parameters() if p.requires_grad]
            opt = torch.optim.SGD(
                params, lr=self.max_lr, momentum=self.momentum, weight_decay=self.weight_decay, foreach=True
            )
            sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=1, T_mult=2, eta_min=self.min_lr)
            for epoch in range(self.fit_epochs):
                if self.schedule == "sgdr":
                    sgdr_epoch(opt, sched, epoch, self.max_lr)
                for idx in torch.randperm(n, generator=gen).to(device, non_blocking=True).split(self.fit_batch):
                    if len(idx) == 1 and not single_ok:
                        continue
                    su = None if shared else sample_units[idx]
                    loss = cross_entropy(net(x[idx]), y[idx], lo_hi, su)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if self.clip_grad_norm is not None:
                        nn.utils.clip_grad_norm_(params, self.clip_grad_norm, foreach=True)
                    opt.step()
        net.eval()
        return net
