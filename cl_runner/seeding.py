"""Seeded random choices of an importance pass or a memory, drawn from their own CPU generators so the
global RNG (the training's batches, dropout) is never touched."""

from __future__ import annotations

import torch
from torch import Tensor


def task_generator(seed: int, task_id: int) -> torch.Generator:
    """CPU generator for a task's random choices in an importance pass (subset, sampled labels):
    seeded from the run's seed and the task id, so a pass is reproducible, differs between run
    seeds (their spread includes it), and leaves the global RNG alone."""
    return torch.Generator().manual_seed((104729 + int(task_id)) * 1_000_003 + int(seed) % 2**31)


def choose_subset(n: int, k: int | None, generator: torch.Generator) -> Tensor | None:
    """Indices of ``k`` of ``n`` samples drawn without replacement, or None for all of them."""
    if k is None or k >= n:
        return None
    return torch.randperm(n, generator=generator)[:k]
