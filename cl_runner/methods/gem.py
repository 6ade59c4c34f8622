"""GEM, Gradient Episodic Memory (Lopez-Paz & Ranzato 2017): every step's gradient is projected so
that, to first order, the loss on no past task's memory goes up.

With g the gradient of the current batch's loss and G = [g_1; …; g_k] the gradients of the mean loss
on each past task's memory (one row per past task), GEM's primal problem is
min_g̃ ½‖g − g̃‖² s.t. G g̃ ≥ 0, solved through its dual

    v* = argmin_v ½ vᵀ (G Gᵀ + ε I) v + (G g)ᵀ v   s.t.  v ≥ γ,        g̃ = Gᵀ v* + g,

only when some constraint is violated (any (G g)_k < 0); otherwise g is kept. This is what the
authors' code (facebookresearch/GradientEpisodicMemory, ``project2cone2``) and mammoth c66408f
(``models/gem.py``, which copies it) compute: the margin γ (``margin``; mammoth ``--gamma``) is a
lower bound on the dual variables, and ε = 1e-3 (``eps``) is added to the diagonal. The paper instead
writes "adding a small constant γ ≥ 0 to v*"; cl-runner follows the code (the published tables ran it).

Memory (mammoth c66408f): at the end of each task, ``buffer_size // n_tasks`` samples of that task
drawn uniformly without replacement (mammoth: the first batch of a shuffled loader) are stored with
their task id; nothing is stored during the task. The authors' GEM code keeps instead the last
``n_memories`` samples seen of each task, updated every batch (a ring per task); that variant is not
implemented (the DER table's GEM rows ran mammoth's). Each step, the gradient of every past task's
memory is computed on all its samples (mammoth ``get_data(buffer_size)``: the whole memory), in train
mode, with the cross-entropy over the units that test that task now (``stream.eval_units``: all seen
classes in class-IL, or every unit with ``active_units=all`` as mammoth's S-MNIST head; the task's own
head in task-IL; the shared head in domain-IL).

How G is computed (same numbers, three paths): for a model whose trainable parameters all live in
``nn.Linear`` layers (the DER table's MLP), G is never materialized: one forward/backward of the whole
memory gives each layer's inputs a_n and output gradients δ_n, task i's gradient of a layer is
Σ_{n∈i} δ_n a_nᵀ, and G g, G Gᵀ and Gᵀ v are matrix products of those factors (:class:`LinearFactors`;
allocating k gradient vectors every step cost more than the rest on the CPU). Any other model: one
vectorized pass (``torch.func.vmap`` over tasks, each task a batch of its own samples); a model with
batch norm: one forward/backward per task, as mammoth, so that each task's batch statistics and
running-statistics updates are its own. G Gᵀ and G g are computed in float32 and the dual in float64
(mammoth: float64 throughout; the projected gradients agree to ~1e-7 relative, float32's rounding).

Solver (:func:`nonneg_qp`): the dual has one variable per past task (k ≤ 19 on the 20-task
benchmarks), so it is solved exactly by a primal active-set method (Lawson & Hanson's NNLS algorithm
for a strictly convex quadratic, on w = v − γ ≥ 0) in float64 NumPy on the host: the k × k matrix is
copied once per violating step (the violation test already synchronizes, as mammoth's ``.sum() != 0``
does), and each active-set iteration decides on the host, where a GPU would pay a synchronization for
each. Measured on this project's 2-core CPU for k = 19: 0.44 ms per solve against 0.055 ms for
quadprog 0.1.14 (mammoth's solver; solutions equal to 1e-17), while a GEM step at 20 tasks costs tens
of milliseconds in the memory's forward/backward and the products; so no compiled dependency is added.
Tested against the brute-force solution (every active set enumerated), the KKT conditions, and
quadprog when it is installed.

Random draws (which samples of a task enter memory) come from a CPU generator seeded from the run's
seed; the memory and the generator are part of the checkpoint. No strength: ``lambda`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cl_runner.data.stream import Task, TaskStream
from cl_runner.methods.base import Batch, Method, named_params
from cl_runner.methods.checks import check_count
from cl_runner.options import Float, check
from cl_runner.seeding import task_generator

#: ``task_generator``'s task id for the episodic memory's draws
EPISODIC_STREAM = (1 << 20) + 16


# ---------------------------------------------------------------------------- the dual QP
def nonneg_qp(q: np.ndarray, c: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """argmin_w ½ wᵀ Q w + cᵀ w subject to w ≥ 0, for a symmetric positive definite Q (k × k), float64.

    Lawson & Hanson's active-set algorithm (NNLS, ch. 23) written for a quadratic: start at w = 0;
    while a bound variable has a negative gradient (Q w + c)_j < 0, free the most negative one and
    solve the free block exactly (Q_FF z_F = −c_F); if that point leaves the feasible set, step
    towards it as far as feasibility allows and bind the variables that reach 0, then re-solve. The
    result is exact up to the linear solves (finite termination; ``max_iter`` guards degenerate
    rounding). NumPy on the host: k ≤ 20, and each iteration decides on the host."""
    k = q.shape[0]
    w = np.zeros(k)
    if k == 0:
        return w
    tol = 1e-12 * max(float(np.abs(np.diag(q)).max()), float(np.abs(c).max()), 1e-300)
    free = np.zeros(k, dtype=bool)
    for _ in range(max_iter or 3 * k + 10):
        bound_grad = np.where(free, np.inf, q @ w + c)
        j = int(np.argmin(bound_grad))
        if not bound_grad[j] < -tol:
            break  # KKT: free gradients are 0 (solved), bound ones ≥ 0
        free[j] = True
        for _ in range(k + 1):
            z = np.zeros(k)
            idx = np.flatnonzero(free)
            z[idx] = -np.linalg.solve(q[np.ix_(idx, idx)], c[idx])
            blocking = free & (z <= 0)
            if not blocking.any():
                w = z
                break
            # the largest step from w towards z that keeps every free variable ≥ 0
            gap = w - z
            ratio = np.where(blocking & (gap > 0), w / np.where(gap > 0, gap, 1.0), np.where(blocking, 0.0, np.inf))
            w = w + min(float(ratio.min()), 1.0) * (z - w)
            free &= w > tol
            w[~free] = 0.0
    return w


def dual_solution(q: Tensor, c: Tensor, margin: float, eps: float) -> Tensor:
    """v* of GEM's dual for Q = G Gᵀ (k × k) and c = G g, in ``c``'s dtype and device: the k × k problem
    in float64 NumPy on the host (mammoth: quadprog in float64)."""
    qn = q.double().cpu().numpy()
    qn = 0.5 * (qn + qn.T) + eps * np.eye(qn.shape[0])
    # v = γ + w, w ≥ 0:  ½ wᵀ Q w + (c + γ Q 1)ᵀ w + const
    w = nonneg_qp(qn, c.double().cpu().numpy() + margin * qn.sum(1))
    return torch.from_numpy(w + margin).to(device=c.device, dtype=c.dtype)


def gem_project(g: Tensor, memories: Tensor, margin: float, eps: float) -> Tensor:
    """GEM's projected gradient (``project2cone2``): g̃ = Gᵀ v* + g with v* the dual solution above.
    ``memories`` is G (k × p). G Gᵀ and G g are computed on the device in the gradients' dtype, the k × k
    dual in float64 on the host (mammoth: all of it in float64 NumPy; the results agree to ~1e-7
    relative, float32's rounding, in a third of the time at k = 19 and 90k parameters)."""
    v = dual_solution(memories @ memories.T, memories @ g, margin, eps)
    return memories.T @ v + g


# ---------------------------------------------------------------------------- flat gradients
def flat_grad(params: list[Tensor]) -> Tensor:
    """The parameters' ``.grad`` as one vector (a missing gradient counts as zeros, as mammoth's
    ``store_grad``)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


@torch.no_grad()
def write_flat_grad(params: list[Tensor], flat: Tensor) -> None:
    """Overwrite every parameter's ``.grad`` with its slice of ``flat``."""
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def masked_cross_entropy(logits: Tensor, y: Tensor, active: Tensor, weight: Tensor) -> Tensor:
    """Σ_n weight_n · CE_n over the units where ``active`` (n_units,) is true."""
    ce = F.cross_entropy(logits.masked_fill(~active, float("-inf")), y, reduction="none")
    return (ce * weight).sum()


def task_gradients(
    model: nn.Module, x: Tensor, y: Tensor, weight: Tensor, active: Tensor, params: dict[str, Tensor]
) -> Tensor:
    """One gradient row per task, (k, p): task i's loss is Σ_n weight[i, n] · CE(model(x[i, n]), y[i, n])
    over the units ``active[i]``; ``x`` is (k, m, …) (padded rows have weight 0). The model runs in its
    current mode. Batch norm: one forward/backward per task (its statistics are the task's own and its
    running statistics are updated, as mammoth's loop); otherwise one vectorized pass (vmap over tasks)."""
    names = list(params)
    if has_batch_norm(model):
        rows = []
        for i in range(x.shape[0]):
            keep = weight[i] > 0
            loss = masked_cross_entropy(model(x[i][keep]), y[i][keep], active[i], weight[i][keep])
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (gr if gr is not None else torch.zeros_like(params[n])).reshape(-1)
                        for gr, n in zip(grads, names, strict=True)
                    ]
                )
            )
        return torch.stack(rows)
    detached = {n: p.detach() for n, p in params.items()}
    consts = {n: b for n, b in model.named_buffers()}
    consts.update({n: p.detach() for n, p in model.named_parameters() if n not in params})

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor, wi: Tensor, ai: Tensor) -> Tensor:
        return masked_cross_entropy(functional_call(model, (p, consts), (xi,)), yi, ai, wi)

    per_task = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0), randomness="different")(detached, x, y, weight, active)
    return torch.cat([per_task[n].reshape(x.shape[0], -1) for n in names], 1)


#: use the Linear-layer factors when every trainable parameter is in an nn.Linear (tests switch it off)
FAST_LINEAR = True


class LinearFactors:
    """Per-task memory gradients of a model whose trainable parameters all live in ``nn.Linear`` layers,
    kept as factors instead of k gradient vectors: task i's gradient of layer l is Σ_{n∈i} δ_n a_nᵀ (δ_n
    the gradient of the weighted loss at the layer's output, a_n its input with a 1 appended for the
    bias). G g, G Gᵀ and Gᵀ v then cost a few matrix products of the memory's size and no k × p
    gradient is materialized (on the CPU, allocating it each step cost more than the rest).
    ``None`` from :meth:`build` when the model does not qualify (another layer type, batch norm, a
    Linear applied more than once)."""

    def __init__(self, layers: list[tuple[nn.Linear, Tensor, Tensor]], k: int, m: int):
        self.layers, self.k, self.m = layers, k, m

    @classmethod
    def build(cls, model: nn.Module, x: Tensor, y: Tensor, weight: Tensor, active: Tensor, params: dict[str, Tensor]):
        if not FAST_LINEAR or has_batch_norm(model):
            return None
        linears = [mod for mod in model.modules() if isinstance(mod, nn.Linear)]
        owned = {id(mod.weight) for mod in linears} | {id(mod.bias) for mod in linears if mod.bias is not None}
        if {id(p) for p in params.values()} != owned or not all(mod.weight.requires_grad for mod in linears):
            return None
        k, m = weight.shape
        seen: dict[nn.Linear, list[tuple[Tensor, Tensor]]] = {mod: [] for mod in linears}

        def hook(mod, args, out):
            seen[mod].append((args[0], out))

        handles = [mod.register_forward_hook(hook) for mod in linears]
        try:
            logits = model(x.flatten(0, 1))
        finally:
            for h in handles:
                h.remove()
        if any(len(v) != 1 or v[0][0].dim() != 2 for v in seen.values()):
            return None
        n_out = logits.shape[1]
        mask = active[:, None, :].expand(k, m, n_out).reshape(k * m, n_out)
        loss = masked_cross_entropy(logits, y.flatten(), mask, weight.flatten())
        outs = [seen[mod][0][1] for mod in linears]
        deltas = torch.autograd.grad(loss, outs)
        layers = []
        for mod, d in zip(linears, deltas, strict=True):
            a = seen[mod][0][0].detach()
            if mod.bias is not None:
                a = torch.cat([a, a.new_ones(len(a), 1)], 1)
            layers.append((mod, d.detach(), a))
        return cls(layers, k, m)

    @staticmethod
    def _grad(mod: nn.Linear) -> Tensor:
        """The layer's current gradient as (out, in [+1 for the bias])."""
        w = mod.weight.grad if mod.weight.grad is not None else torch.zeros_like(mod.weight)
        if mod.bias is None:
            return w
        b = mod.bias.grad if mod.bias.grad is not None else torch.zeros_like(mod.bias)
        return torch.cat([w, b[:, None]], 1)

    def dots(self) -> Tensor:
        """G g (k,), g = the layers' current ``.grad``."""
        per_sample = sum(((a @ self._grad(mod).T) * d).sum(1) for mod, d, a in self.layers)
        return per_sample.view(self.k, self.m).sum(1)

    def gram(self, kernel: bool | None = None) -> Tensor:
        """G Gᵀ (k × k): per layer, Σ_{n,n'} (δ_n·δ_n')(a_n·a_n') summed within tasks (``kernel``), or
        the per-task gradients materialized for that layer; by default whichever costs fewer products
        (the kernel for a memory small against the layer)."""
        k, m = self.k, self.m
        total = None
        for _, d, a in self.layers:
            n, n_out, n_in = len(d), d.shape[1], a.shape[1]
            use_kernel = n * n * (n_out + n_in) <= n * n_out * n_in + k * k * n_out * n_in if kernel is None else kernel
            if use_kernel:
                q = ((d @ d.T) * (a @ a.T)).view(k, m, k, m).sum((1, 3))
            else:
                g = torch.bmm(d.view(k, m, n_out).transpose(1, 2), a.view(k, m, n_in)).flatten(1)
                q = g @ g.T
            total = q if total is None else total + q
        return total

    @torch.no_grad()
    def add(self, v: Tensor) -> None:
        """``.grad`` += Gᵀ v: per layer (δ ⊙ v_task)ᵀ a."""
        scale = v.repeat_interleave(self.m)[:, None]
        for mod, d, a in self.layers:
            step = (d * scale).T @ a
            if mod.weight.grad is None:
                mod.weight.grad = torch.zeros_like(mod.weight)
            if mod.bias is None:
                mod.weight.grad += step
                continue
            mod.weight.grad += step[:, :-1]
            if mod.bias.grad is None:
                mod.bias.grad = torch.zeros_like(mod.bias)
            mod.bias.grad += step[:, -1]


# ---------------------------------------------------------------------------- the memory
class EpisodicMemory:
    """Per-task slots filled at the end of each task (mammoth c66408f's GEM and A-GEM): ``per_task``
    samples of the task drawn uniformly without replacement (all of them when the task has fewer),
    appended after the earlier tasks' samples. Device tensors x, y, task; ``counts[k]`` = samples of task k."""

    def __init__(self) -> None:
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.task: Tensor | None = None
        self.counts: list[int] = []

    @property
    def filled(self) -> int:
        return sum(self.counts)

    @torch.no_grad()
    def add_task(self, task: Task, per_task: int, generator: torch.Generator) -> None:
        n = min(per_task, task.n_train)
        idx = torch.randperm(task.n_train, generator=generator)[:n].to(task.x_train.device)
        x, y = task.x_train[idx], task.y_train[idx]
        t = torch.full((n,), task.id, dtype=torch.long, device=y.device)
        if self.x is None:
            self.x, self.y, self.task = x, y, t
        else:
            self.x, self.y, self.task = torch.cat([self.x, x]), torch.cat([self.y, y]), torch.cat([self.task, t])
        self.counts.append(n)

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "task": self.task, "counts": list(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.x, self.y, self.task = state["x"], state["y"], state["task"]
        self.counts = [int(c) for c in state["counts"]]


class EpisodicMethod(Method):
    """Shared by GEM and A-GEM: the episodic memory, filled at the end of every task but the last
    (nothing would read the last one), and its generator in the checkpoint."""

    uses_strength = False

    def __init__(self, strength: float, buffer_size: int):
        super().__init__(strength)
        self.buffer_size = check_count("buffer_size", buffer_size)
        self.memory = EpisodicMemory()
        self.generator = torch.Generator()
        self._task = 0

    def setup(self, model: nn.Module, stream: TaskStream, seed: int = 0) -> None:
        super().setup(model, stream, seed)
        self.memory = EpisodicMemory()
        self.generator = task_generator(self.seed, EPISODIC_STREAM)
        self.per_task = self.buffer_size // max(len(stream), 1) if stream is not None else self.buffer_size

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
        self.generator.set_state(state["generator"])

    def before_task(self, model: nn.Module, task: Task) -> None:
        self._task = task.id

    def after_task(self, model: nn.Module, task: Task) -> None:
        if self.per_task > 0:
            self.memory.add_task(task, self.per_task, self.generator)

    def units_mask(self, tasks: list[int], n_outputs: int, device: torch.device) -> Tensor:
        """(len(tasks), n_outputs) bool: the units that test each task now (``stream.eval_units``)."""
        unit = torch.arange(n_outputs, device=device)
        ranges = torch.tensor([self.stream.eval_units(self._task, k) for k in tasks], device=device)
        return (unit >= ranges[:, :1]) & (unit < ranges[:, 1:])


class GEM(EpisodicMethod):
    name = "gem"

    def __init__(self, strength: float, buffer_size: int, margin: float, eps: float):
        super().__init__(strength, buffer_size)
        self.margin = float(check("method.margin", margin, Float(lo=0.0)))
        self.eps = float(check("method.eps", eps, Float(lo=0.0, lo_open=True)))
        self.projected = 0  # steps whose gradient was projected (diagnostics; not in the checkpoint)
        self._layout = None

    def before_task(self, model: nn.Module, task: Task) -> None:
        super().before_task(model, task)
        self._layout: tuple[Tensor, Tensor, Tensor] | None = None  # the memory's (k, m) view, made once per task

    def layout(self) -> tuple[Tensor, Tensor, Tensor]:
        """(idx, weight, active): ``idx`` (k, m) indexes task i's samples in the memory (padded with its
        first one), ``weight`` (k, m) = 1/count on real rows and 0 on padding, ``active`` (k, units)."""
        if self._layout is None:
            mem = self.memory
            dev = mem.y.device
            k, m = len(mem.counts), max(mem.counts)
            starts = torch.tensor([0, *mem.counts[:-1]]).cumsum(0)[:, None]
            counts = torch.tensor(mem.counts)[:, None]
            pos = torch.arange(m)[None]
            valid = pos < counts
            idx = torch.where(valid, starts + pos, starts)
            weight = valid.float() / counts.clamp_min(1).float()
            active = self.units_mask(list(range(k)), self.stream.n_outputs, torch.device("cpu"))
            self._layout = (idx.to(dev), weight.to(dev), active.to(dev))
        return self._layout

    def after_task(self, model: nn.Module, task: Task) -> None:
        super().after_task(model, task)
        self._layout = None

    def memory_gradients(self, model: nn.Module) -> Tensor | None:
        """(k, p): the gradient of the mean cross-entropy on each past task's memory, or None."""
        if self.memory.filled == 0:
            return None
        idx, weight, active = self.layout()
        mem = self.memory
        return task_gradients(model, mem.x[idx], mem.y[idx], weight, active, named_params(model))

    def after_backward(self, model: nn.Module, batch: Batch | None = None) -> None:
        if self.memory.filled == 0:
            return
        idx, weight, active = self.layout()
        factors = LinearFactors.build(
            model, self.memory.x[idx], self.memory.y[idx], weight, active, named_params(model)
        )
        if factors is not None:
            c = factors.dots()
            if not bool((c < 0).any()):
                return
            self.projected += 1
            factors.add(dual_solution(factors.gram(), c, self.margin, self.eps))
            return
        memories = self.memory_gradients(model)
        params = list(named_params(model).values())
        g = flat_grad(params)
        if not bool((memories @ g < 0).any()):
            return
        self.projected += 1
        write_flat_grad(params, gem_project(g, memories, self.margin, self.eps))
