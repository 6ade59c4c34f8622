"""iCaRL, incremental Classifier and Representation Learning (Rebuffi et al. 2017), as mammoth c66408f
(``models/icarl.py``) runs it in the DER table.

Training (mammoth ``observe``/``get_loss``): task t trains on its own data together with the exemplars
kept so far (mammoth concatenates the memory to the task's dataset, so one epoch covers both), with
the binary cross-entropy over the units up to the task's last one, a = [0, hi_t):

    L = mean_{n, u < hi_t} BCE(σ(z_u(x_n)), target_{n,u}),   target_{n,u} = σ(z_old,u(x_n)) for u < lo_t,
                                                              1[y_n = u]       for lo_t ≤ u < hi_t,

z_old the model as it was at the end of the previous task (in eval mode); on the first task every
target is the one-hot label. The units a are iCaRL's own (whatever ``active_units`` says: mammoth
slices its 10-unit head to the classes seen). ``wd_reg`` adds wd_reg · Σ θ² (mammoth ``--wd_reg``, 0
in every MNIST row of its best_args), as its gradient 2·wd_reg·θ on ``.grad`` after the backward.
mammoth c66408f has no per-task learning-rate schedule for iCaRL on MNIST (plain SGD, the run's lr),
nor does cl-runner; its newer versions replace wd_reg by the optimizer's weight decay.

Exemplars (mammoth ``end_task``/``fill_buffer``, with the model in eval mode): the memory of
``buffer_size`` is split equally over the classes seen, m = buffer_size // #classes; each old class
keeps its first m exemplars (herding order), and each class of the task just trained gets m by
herding (Rebuffi et al., Algorithm 4): with φ the features (the input of the model's ``head``) of the
class's training samples and μ their mean, the k-th exemplar is

    p_k = argmin_x ‖ μ − (φ(x) + Σ_{j<k} φ(p_j)) / k ‖,   x not chosen yet.

``normalize_features``: true (the paper; newest mammoth) L2-normalizes φ for herding and for the
classifier below; false is mammoth c66408f, the DER table's code, which uses the raw features.

Test time (the ``evaluator`` hook, what the accuracy matrix is computed with): the nearest mean of
exemplars, score_u(x) = −‖φ(x) − μ_u‖² with μ_u the mean feature of class u's exemplars (re-normalized
and φ(x) normalized when ``normalize_features``), −∞ for a unit without exemplars. The class means are
computed with the model at evaluation (eval mode), as mammoth's lazy ``compute_class_means``. mammoth
c66408f averages every buffer row of label 0, including the rows a memory not divisible by the class
count leaves empty (zeros); those rows are left out here (the DER table's last rows are unaffected:
200, 500 and 5120 are multiples of 10). Newest mammoth also averages horizontally flipped images'
features (a CIFAR device); not done.

``exemplar_inputs``: what the exemplars are trained on. ``stored``: the stored images (the paper;
newest mammoth). ``uint8_truncated``: mammoth c66408f on MNIST, whose ``begin_task`` appends the
stored [0, 1] images to the dataset as ``examples.type(torch.uint8)`` without scaling by 255 (its
later ``refold_transform`` multiplies first), so ToTensor then gives ⌊x⌋/255: every pixel 0 except
those exactly 1.0, which become 1/255. The exemplars trained on are nearly black images with their
old labels; herding and the class means use the stored images. The DER preset sets it, to run what
the table ran.

Scenarios: class-IL as above; task-IL the same formula (its units are laid out task after task;
evaluation restricts each task to its own head); domain-IL has no old units (every task's classes
share the head), so the loss is the one-hot BCE over the head, exemplars are kept per (task, class)
and the class means pool a unit's exemplars of every task. The last task's exemplars are selected
lazily by ``evaluator`` (the trainer calls ``after_task`` for every task but the last); evaluations
within a task (``eval_every: epoch``) select the current task's exemplars for that evaluation only.
Herding is deterministic (no random draw); the memory is in the checkpoint, the frozen old model is
rebuilt from the model at each task's start.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_runner.data.stream import Task, TaskStream
from cl_runner.methods.base import Batch, Method, TrainingData, eval_mode
from cl_runner.methods.checks import check_bool, check_choice, check_count
from cl_runner.methods.lwf import add_weight_decay, frozen_copy, head_inputs
from cl_runner.options import Float, check

EXEMPLAR_INPUTS = ("stored", "uint8_truncated")


def herding(feats: Tensor, valid: Tensor, count: int) -> Tensor:
    """Herding for C classes at once: ``feats`` (C, n, d) with ``valid`` (C, n) marking real samples
    (padding otherwise); returns (C, count) indices in selection order (rows past a class's number of
    samples are meaningless). The cost is computed as mammoth's loop computes it, step by step."""
    c, n, _ = feats.shape
    n_valid = valid.sum(1, keepdim=True).clamp_min(1)
    mean = (feats * valid[..., None]).sum(1, keepdim=True) / n_valid[..., None].to(feats.dtype)  # (C, 1, d)
    running = torch.zeros_like(mean)
    taken = ~valid
    chosen = torch.zeros(c, count, dtype=torch.long, device=feats.device)
    rows = torch.arange(c, device=feats.device)
    for i in range(count):
        cost = (mean - (feats + running) / (i + 1)).norm(2, 2).masked_fill(taken, float("inf"))
        idx = cost.argmin(1)
        chosen[:, i] = idx
        running += feats[rows, idx][:, None]
        taken[rows, idx] = True
    return chosen


class NearestMeanOfExemplars(nn.Module):
    """Scores −‖φ(x) − μ_u‖² per output unit u (−∞ where u has no exemplar); φ = the model's head input.
    Holds the model without registering it (its train/eval flag stays the model's own)."""

    def __init__(self, model: nn.Module, means: Tensor, units: Tensor, n_outputs: int, normalize: bool):
        super().__init__()
        self._model = [model]
        self.means, self.units, self.n_outputs, self.normalize = means, units, n_outputs, normalize

    def forward(self, x: Tensor) -> Tensor:
        model = self._model[0]
        with eval_mode(model):
            feats = head_inputs(model, x, chunk=len(x) or 1)
        if self.normalize:
            feats = F.normalize(feats, dim=1)
        dist = (self.means[None] - feats[:, None]).pow(2).sum(2)
        scores = feats.new_full((len(x), self.n_outputs), float("-inf"))
        scores[:, self.units] = -dist
        return scores


class ICaRL(Method):
    name = "icarl"
    uses_strength = False

    def __init__(
        self, strength: float, buffer_size: int, normalize_features: bool, exemplar_inputs: str, wd_reg: float
    ):
        super().__init__(strength)
        self.buffer_size = check_count("buffer_size", buffer_size)
        self.normalize_features = check_bool("normalize_features", normalize_features)
        self.exemplar_inputs = check_choice("exemplar_inputs", exemplar_inputs, EXEMPLAR_INPUTS)
        self.wd_reg = float(check("method.wd_reg", wd_reg, Float(lo=0.0)))
        self._reset()

    def _reset(self) -> None:
        self.memory: dict[str, Tensor] = {}  # x, y, task, rank (position in its class's herding order)
        self.herded = 0  # tasks whose classes have exemplars in memory
        self._old: nn.Module | None = None
        self._units = (0, 0)  # (lo, hi): units of old classes [0, lo), BCE over [0, hi)

    def setup(self, model: nn.Module, stream: TaskStream, seed: int = 0) -> None:
        super().setup(model, stream, seed)
        self._reset()

    def state_dict(self) -> dict[str, Any]:
        return {"memory": dict(self.memory), "herded": self.herded}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.memory = dict(state["memory"])
        self.herded = int(state["herded"])

    def undefined_metrics(self) -> dict[str, str]:
        if getattr(self, "stream", None) is not None and self.stream.scenario == "domain":
            return {}
        reason = (
            "iCaRL's nearest-mean classifier has no mean for a class before its task is trained, so a later "
            "task's accuracy is 0 by construction (mammoth reports no FWT for iCaRL)"
        )
        return {"fwt": reason}

    # ------------------------------------------------------------------ training
    def training_data(self, stream: TaskStream, t: int) -> TrainingData:
        task = stream[t]
        if not self.memory:
            return TrainingData(task.x_train, task.y_train, task.units)
        x = self.memory["x"]
        if self.exemplar_inputs == "uint8_truncated":
            x = x.clamp(0, 255).floor() / 255
        return TrainingData(torch.cat([task.x_train, x]), torch.cat([task.y_train, self.memory["y"]]), task.units)

    def before_task(self, model: nn.Module, task: Task) -> None:
        lo, hi = task.own_units
        self._units = (0, hi) if self.stream.scenario == "domain" else (lo, hi)
        self._old = frozen_copy(model) if task.id > 0 and self._units[0] > 0 else None

    def task_loss(self, batch: Batch, logits: Tensor) -> Tensor:
        lo, hi = self._units
        targets = F.one_hot(batch.y, logits.shape[1]).to(logits.dtype)[:, :hi]
        if self._old is not None:
            with torch.no_grad():
                targets[:, :lo] = torch.sigmoid(self._old(batch.x)[:, :lo])
        return F.binary_cross_entropy_with_logits(logits[:, :hi], targets)

    def after_backward(self, model: nn.Module, batch: Batch | None = None) -> None:
        if self.wd_reg:
            add_weight_decay(model, self.wd_reg)

    # ------------------------------------------------------------------ exemplars
    def after_task(self, model: nn.Module, task: Task) -> None:
        self.memory = self.exemplars(model, task)
        self.herded = task.id + 1

    @torch.no_grad()
    def exemplars(self, model: nn.Module, task: Task) -> dict[str, Tensor]:
        """The memory after ``task``: old classes cut to m exemplars each, the task's classes herded."""
        n_out = self.stream.n_outputs
        y = task.y_train
        classes = torch.unique(y)  # sorted, as mammoth's a_y.unique()
        old_groups = 0
        if self.memory:
            old_groups = len(torch.unique(self.memory["task"] * n_out + self.memory["y"]))
        per_class = self.buffer_size // (old_groups + len(classes))
        kept = {}
        if self.memory:
            keep = self.memory["rank"] < per_class
            kept = {k: v[keep] for k, v in self.memory.items()}
        if per_class == 0 or len(classes) == 0:
            return kept
        with eval_mode(model):
            feats = head_inputs(model, task.x_train)
        if self.normalize_features:
            feats = F.normalize(feats, dim=1)
        # pad the task's classes to (C, n_max, d)
        onehot = y[None] == classes[:, None]  # (C, n)
        counts = onehot.sum(1)
        n_max = int(counts.max())
        order = torch.argsort((~onehot).to(torch.int8), dim=1, stable=True)[:, :n_max]  # each class's samples first
        valid = torch.arange(n_max, device=y.device)[None] < counts[:, None]
        chosen = herding(feats[order], valid, min(per_class, n_max))
        rank = torch.arange(chosen.shape[1], device=y.device)[None].expand_as(chosen)
        take = rank < counts[:, None].clamp_max(per_class)
        idx = order.gather(1, chosen)[take]  # class by class, in herding order
        new = {
            "x": task.x_train[idx],
            "y": y[idx],
            "task": torch.full_like(y[idx], task.id),
            "rank": rank[take],
        }
        if not kept:
            return new
        return {k: torch.cat([kept[k], new[k]]) for k in new}

    # ------------------------------------------------------------------ test time
    def evaluator(self, model: nn.Module, trained: int) -> nn.Module:
        memory = self.memory
        if self.herded <= trained:  # the last task (no after_task) or within a task: select for this call
            memory = self.exemplars(model, self.stream[trained])
        n_out = self.stream.n_outputs
        if not memory:
            means = torch.zeros(0, 1, device=next(model.parameters()).device)
            return NearestMeanOfExemplars(model, means, torch.zeros(0, dtype=torch.long), n_out, False)
        with torch.no_grad(), eval_mode(model):
            feats = head_inputs(model, memory["x"])
        if self.normalize_features:
            feats = F.normalize(feats, dim=1)
        units = torch.unique(memory["y"])
        onehot = (memory["y"][None] == units[:, None]).to(feats.dtype)  # (C, n)
        means = (onehot @ feats) / onehot.sum(1, keepdim=True)
        if self.normalize_features:
            means = F.normalize(means, dim=1)
        return NearestMeanOfExemplars(model, means, units, n_out, self.normalize_features)
