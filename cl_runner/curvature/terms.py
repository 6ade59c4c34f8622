"""The EWC penalty over structured Fishers: terms (anchor θ*_k, Fisher F_k, weight w_k), their
quadratic penalty Σ_k w_k (θ − θ*_k)ᵀ F_k (θ − θ*_k) and its fused gradient, and their checkpoint state."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cl_runner.curvature.structures import Curvature, from_state
from cl_runner.models.params import named_params

Term = tuple[dict[str, Tensor], Curvature, float]  # (anchor θ*, F, weight w)


def penalty(terms: list[Term], model: nn.Module) -> Tensor | None:
    """Σ_k w_k (θ − θ*_k)ᵀ F_k (θ − θ*_k) (differentiable; the trainer uses :func:`add_penalty_grad`)."""
    params = named_params(model)
    total = None
    for anchor, f, w in terms:
        q = w * f.quadratic({n: p - anchor[n] for n, p in params.items()})
        total = q if total is None else total + q
    return total


@torch.no_grad()
def add_penalty_grad(terms: list[Term], model: nn.Module, scale: float) -> Tensor | None:
    """``scale`` · :func:`penalty` and its gradient 2·scale·Σ_k w_k F_k (θ − θ*_k), added to ``.grad``
    (one matvec per term: the value costs a dot product more)."""
    if not terms:
        return None
    params = named_params(model)
    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    total = None
    for anchor, f, w in terms:
        d = {n: p - anchor[n] for n, p in params.items()}
        fd = f.matvec(d)
        torch._foreach_add_([p.grad for p in params.values()], [fd[n] for n in params], alpha=2.0 * scale * w)
        q = w * torch.stack([torch.dot(d[n].flatten(), fd[n].flatten()) for n in params]).sum()
        total = q if total is None else total + q
    return scale * total


def terms_state(terms: list[Term]) -> list[tuple[dict[str, Tensor], dict[str, Any], float]]:
    return [(a, f.state_dict(), w) for a, f, w in terms]


def terms_from_state(state: list) -> list[Term]:
    return [(a, from_state(f), w) for a, f, w in state]
