"""LwF, Learning without Forgetting (Li & Hoiem 2017): the outputs of the model as it was before the
task are distilled into the model while it learns the task, on the task's own inputs:

    L(θ) = CE(y, z_θ(x)) + λ · Σ_heads − Σ_u softmax(z_old(x)/T)_u · log softmax(z_θ(x)/T)_u

averaged over the batch, with z_old the frozen copy of the model taken at the start of the task and
T = ``temperature`` (Li & Hoiem: T = 2; mammoth c66408f ``models/lwf.py``: its ``smooth`` raises the
softmax to 1/2 and renormalizes, softmax(z)^(1/T)/Σ = softmax(z/T) with T = 2 written in the code,
its ``--softmax_temp`` being read by nothing). λ is the run's ``lambda`` (mammoth ``--alpha``). No T²
factor (Hinton's distillation has one; Li & Hoiem and mammoth do not). λ = 0 keeps no old model and
adds nothing: finetune.

Which units (the disputed part):

- Class-IL (mammoth, the DER table's S-MNIST row): one softmax over the previous tasks' classes
  [0, first unit of task t); the current task's cross-entropy over the units the scenario activates,
  or with ``ce_units: seen`` over the classes seen so far [0, last unit of task t) whatever
  ``active_units`` says: mammoth masks its 10-unit head so (``self.eye[current_task * cpt - 1]``),
  so the DER preset, which trains the other methods on all units (``active_units=all``), sets it.
- Task-IL (Li & Hoiem's setting, one head per task): each previous task's head is distilled with its
  own softmax and the terms are summed (mammoth has no task-IL training; it masks a class-IL model).
- Domain-IL: the shared head is distilled (there is no new head, so no warm-up).

Start of a task t ≥ 1 (mammoth ``begin_task``): with ``warmup_epochs`` > 0 the new task's head units
are trained alone first (Li & Hoiem's warm-up step): the features (the input of the model's ``head``)
frozen and computed in eval mode, SGD with ``warmup_lr`` (mammoth: ``--lr``) over the task's data in
shuffled batches of ``warmup_batch`` (mammoth: ``--batch_size``) for ``warmup_epochs`` epochs (mammoth:
``--n_epochs``), cross-entropy over the new task's own units only; only those rows of the head (and
of its bias) change. This writes the model outside the optimizer, so it is off by default
(``warmup_epochs: 0``); the DER preset turns it on as mammoth. The frozen copy is taken after the
warm-up (mammoth records its soft targets then); the distilled units are not touched by the warm-up,
so their targets are the previous task's final outputs either way.

``wd_reg`` adds wd_reg · Σ θ² over every parameter to the loss (mammoth ``--wd_reg``, 0.0005 on
S-MNIST), as its gradient 2 · wd_reg · θ added to ``.grad`` after the backward (the logged loss leaves
it out); SGD's ``weight_decay`` = 2 · wd_reg is the same update. The warm-up's shuffles come from a CPU
generator seeded from the run's seed, saved in the checkpoint; the frozen copy is rebuilt from the
model at each task's start, so it needs no checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_runner.data.stream import Task, TaskStream
from cl_runner.methods.base import Batch, Method, cross_entropy, eval_mode, named_params
from cl_runner.methods.checks import MAX_COUNT, check_choice, check_count
from cl_runner.options import Float, Int, check
from cl_runner.seeding import task_generator

CE_UNITS = ("active", "seen")
#: ``task_generator``'s task id for the warm-up's shuffles
LWF_STREAM = (1 << 20) + 32


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of the model in eval mode, without gradients (the teacher of a distillation)."""
    old = copy.deepcopy(model)
    for p in old.parameters():
        p.grad = None
        p.requires_grad_(False)
    return old.eval()


@torch.no_grad()
def head_inputs(model: nn.Module, x: Tensor, chunk: int = 1024) -> Tensor:
    """The input of the model's ``head`` layer (its features), (n, d), in whatever mode the model is in
    (callers use :func:`eval_mode`). A forward pre-hook on ``head``, removed afterwards."""
    seen: list[Tensor] = []
    handle = model.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].flatten(1)))
    try:
        for s in range(0, len(x), chunk):
            model(x[s : s + chunk])
    finally:
        handle.remove()
    if not seen:
        return x.new_zeros(0, model.head.in_features)
    return torch.cat(seen)


def soft_cross_entropy(teacher: Tensor, student: Tensor, temperature: float) -> Tensor:
    """−mean_n Σ_u softmax(teacher/T)_u · log softmax(student/T)_u (mammoth's ``modified_kl_div`` of
    ``smooth``-ed softmaxes)."""
    target = F.softmax(teacher / temperature, dim=1)
    return -(target * F.log_softmax(student / temperature, dim=1)).sum(1).mean()


@torch.no_grad()
def add_weight_decay(model: nn.Module, wd_reg: float) -> None:
    """``.grad`` += ∇(wd_reg · Σ θ²) = 2 · wd_reg · θ, every trainable parameter."""
    params = [p for p in named_params(model).values()]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    torch._foreach_add_([p.grad for p in params], params, alpha=2.0 * wd_reg)


class LwF(Method):
    name = "lwf"
    uses_strength = True

    def __init__(
        self,
        strength: float,
        temperature: float,
        ce_units: str,
        warmup_epochs: int,
        warmup_lr: float,
        warmup_batch: int,
        wd_reg: float,
    ):
        super().__init__(strength)
        self.temperature = float(check("method.temperature", temperature, Float(lo=0.0, lo_open=True)))
        self.ce_units = check_choice("ce_units", ce_units, CE_UNITS)
        self.warmup_epochs = check("method.warmup_epochs", warmup_epochs, Int(lo=0, hi=MAX_COUNT))
        self.warmup_lr = float(check("method.warmup_lr", warmup_lr, Float(lo=0.0, lo_open=True)))
        self.warmup_batch = check_count("warmup_batch", warmup_batch)
        self.wd_reg = float(check("method.wd_reg", wd_reg, Float(lo=0.0)))
        self.generator = torch.Generator()
        self._old: nn.Module | None = None
        self._distill: list[tuple[int, int]] = []
        self._ce: tuple[int, int] | None = None

    def setup(self, model: nn.Module, stream: TaskStream, seed: int = 0) -> None:
        super().setup(model, stream, seed)
        self.generator = task_generator(self.seed, LWF_STREAM)
        self._old, self._distill, self._ce = None, [], None

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def before_task(self, model: nn.Module, task: Task) -> None:
        scenario = self.stream.scenario
        self._ce = (0, task.own_units[1]) if self.ce_units == "seen" and scenario == "class" else None
        self._old, self._distill = None, []
        if task.id == 0:
            return
        if self.warmup_epochs and scenario != "domain":
            self.warm_up(model, task)
        if not self.strength:
            return
        if scenario == "class":
            self._distill = [(0, task.own_units[0])] if task.own_units[0] > 0 else []
        elif scenario == "task":
            self._distill = [tuple(self.stream[j].own_units) for j in range(task.id)]
        else:
            self._distill = [tuple(task.units)]
        self._old = frozen_copy(model)

    def warm_up(self, model: nn.Module, task: Task) -> None:
        """SGD on the new task's head rows alone, the features frozen (mammoth ``begin_task``)."""
        lo, hi = task.own_units
        head = model.head
        with eval_mode(model):
            feats = head_inputs(model, task.x_train)
        y = task.y_train - lo
        for _ in range(self.warmup_epochs):
            perm = torch.randperm(len(y), generator=self.generator).to(y.device, non_blocking=True)
            for idx in perm.split(self.warmup_batch):
                weight = head.weight[lo:hi].detach().requires_grad_()
                bias = None if head.bias is None else head.bias[lo:hi].detach().requires_grad_()
                loss = F.cross_entropy(F.linear(feats[idx], weight, bias), y[idx])
                grads = torch.autograd.grad(loss, [weight] if bias is None else [weight, bias])
                with torch.no_grad():
                    head.weight[lo:hi] -= self.warmup_lr * grads[0]
                    if bias is not None:
                        head.bias[lo:hi] -= self.warmup_lr * grads[1]

    def task_loss(self, batch: Batch, logits: Tensor) -> Tensor:
        if self._ce is None or batch.sample_units is not None:
            return super().task_loss(batch, logits)
        return cross_entropy(logits, batch.y, self._ce)

    def loss(self, batch: Batch, logits: Tensor) -> Tensor | None:
        if self._old is None or not self._distill:
            return None
        with torch.no_grad():
            old = self._old(batch.x)
        total = sum(soft_cross_entropy(old[:, lo:hi], logits[:, lo:hi], self.temperature) for lo, hi in self._distill)
        return self.strength * total

    def after_backward(self, model: nn.Module, batch: Batch | None = None) -> None:
        if self.wd_reg:
            add_weight_decay(model, self.wd_reg)
