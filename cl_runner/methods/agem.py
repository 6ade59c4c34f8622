"""A-GEM, Averaged GEM (Chaudhry et al. 2019): the step's gradient g is projected when it conflicts with
the gradient g_ref of the loss on a batch drawn from the episodic memory,

    g̃ = g − (gᵀ g_ref / g_refᵀ g_ref) · g_ref    if gᵀ g_ref < 0,    else g̃ = g.

As mammoth c66408f (``models/agem.py``), which the DER table ran:

- Memory: at the end of each task, ``buffer_size // n_tasks`` samples of that task drawn uniformly
  without replacement (mammoth: the first batch of a shuffled loader, added to its buffer; the sizes
  add up to at most ``buffer_size``, so its reservoir only appends), nothing during the task. The
  paper's memory (a ring of the last samples per task, filled while training) is not implemented.
- Each step, once the memory holds samples, ``replay_batch`` of them (mammoth ``--minibatch_size``;
  all of them when fewer) drawn uniformly without replacement over every task's samples, in train
  mode; g_ref is the gradient of their mean cross-entropy, each sample over the units that test its
  task now (``stream.eval_units``: every unit with ``active_units=all`` as mammoth's S-MNIST head,
  the seen classes in class-IL, its own head in task-IL, the shared head in domain-IL).
- g is the gradient of the trainer's task loss (``.grad`` after the backward, before any penalty);
  the projection is computed on the device without a host synchronization (the test gᵀg_ref < 0 is
  a ``torch.where``; mammoth reads it back with ``.item()``).

Random draws (the memory's samples, the replayed batch) come from a CPU generator seeded from the
run's seed; the memory and the generator are in the checkpoint. No strength: ``lambda`` is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cl_runner.methods.base import Batch, cross_entropy, named_params
from cl_runner.methods.checks import check_count
from cl_runner.methods.gem import EpisodicMethod, flat_grad, write_flat_grad


def agem_project(g: Tensor, g_ref: Tensor) -> Tensor:
    """g − (gᵀg_ref / g_refᵀg_ref)·g_ref where gᵀg_ref < 0, else g (no host synchronization)."""
    dot = torch.dot(g, g_ref)
    coef = torch.where(dot < 0, dot / torch.dot(g_ref, g_ref).clamp_min(torch.finfo(g.dtype).tiny), 0.0)
    return g - coef * g_ref


class AGEM(EpisodicMethod):
    name = "agem"

    def __init__(self, strength: float, buffer_size: int, replay_batch: int):
        super().__init__(strength, buffer_size)
        self.replay_batch = check_count("replay_batch", replay_batch)

    def reference_batch(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(x, y, task) of ``replay_batch`` memory samples drawn without replacement, or None."""
        mem = self.memory
        if mem.filled == 0:
            return None
        idx = torch.randperm(mem.filled, generator=self.generator)[: self.replay_batch].to(mem.y.device)
        return mem.x[idx], mem.y[idx], mem.task[idx]

    def reference_gradient(self, model: nn.Module, params: list[Tensor]) -> Tensor | None:
        drawn = self.reference_batch()
        if drawn is None:
            return None
        x, y, task = drawn
        ranges = [self.stream.eval_units(self._task, k) for k in range(len(self.memory.counts))]
        logits = model(x)
        if len(set(ranges)) == 1:  # one range for every sample (domain-, class-IL): decided on the host
            loss = cross_entropy(logits, y, ranges[0])
        else:
            loss = cross_entropy(logits, y, (0, 0), torch.tensor(ranges, device=y.device)[task])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
        )

    def after_backward(self, model: nn.Module, batch: Batch | None = None) -> None:
        params = list(named_params(model).values())
        g_ref = self.reference_gradient(model, params)
        if g_ref is None:
            return
        write_flat_grad(params, agem_project(flat_grad(params), g_ref))
