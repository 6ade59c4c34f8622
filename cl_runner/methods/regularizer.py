"""The quadratic penalty shared by L2, EWC, online EWC, MAS, SI, RWalk and SCP.

    R(θ) = s · Σ_k Σ_i Ω_k,i (θ_i − θ*_k,i)²,   s = ½ if ``half`` else 1

over the stored terms k (one per past task for EWC, a single term for the others), each an anchor
θ*_k and an importance Ω_k (Ω ≡ 1 for L2). The trainer multiplies R by λ.

Per-step cost: the terms are merged at consolidation time into one quadratic with the same value
and gradient,

    Σ_k Ω_k (θ − θ*_k)² = W (θ − θ̄)² + C,   W = Σ_k Ω_k,  θ̄ = Σ_k Ω_k θ*_k / W,  C = Σ_k Ω_k (θ*_k − θ̄)²

(the cross term vanishes because Σ_k Ω_k (θ̄ − θ*_k) = 0), so a step costs one
``(W · (θ − θ̄)²).sum()`` per parameter tensor however many tasks EWC has seen. With a single term,
θ̄ = θ* and C = 0 exactly, so R is exactly 0 at the anchor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cl_runner.methods.base import Method, named_params
from cl_runner.methods.checks import check_bool


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the trainable parameters."""
    return {n: p.detach().clone() for n, p in named_params(model).items()}


class QuadraticPenalty(Method):
    """Base class: holds the penalty terms; subclasses decide what goes in at ``after_task``."""

    uses_strength = True

    def __init__(self, strength: float = 0.0, half: bool = False):
        super().__init__(strength)
        self.half = check_bool("half", half)
        self.n_terms = 0
        self._anchor: dict[str, Tensor] = {}  # θ̄ per parameter
        self._weight: dict[str, Tensor] | None = None  # W per parameter; None means Ω ≡ 1
        self._const: Tensor | None = None  # C (summed over parameters); None when it is 0

    def set_terms(self, terms: Sequence[tuple[dict[str, Tensor], dict[str, Tensor] | None]]) -> None:
        """Replace the penalty by the given (anchor, importance) pairs; importance None = ones."""
        self.n_terms = len(terms)
        self._anchor, self._weight, self._const = {}, None, None
        if not terms:
            return
        if len(terms) == 1:
            anchor, weight = terms[0]
            self._anchor = {n: a.detach().clone() for n, a in anchor.items()}
            self._weight = None if weight is None else {n: weight[n].detach().clone() for n in anchor}
            return
        const = None
        self._weight = {}
        for n in terms[0][0]:
            anchors = torch.stack([a[n].detach() for a, _ in terms])
            weights = torch.stack([torch.ones_like(a[n]) if w is None else w[n].detach() for a, w in terms])
            total = weights.sum(0)
            # θ̄ = Σ Ω θ* / W; where W = 0 no term depends on θ_i, any anchor will do (the latest)
            mean = torch.where(total > 0, (weights * anchors).sum(0) / total.clamp_min(1e-38), anchors[-1])
            c = (weights * (anchors - mean).square()).sum()
            const = c if const is None else const + c
            self._anchor[n], self._weight[n] = mean, total
        self._const = const

    def penalty(self, model: nn.Module) -> Tensor | None:
        if not self._anchor:
            return None
        total = self._const
        for n, p in named_params(model).items():
            d2 = (p - self._anchor[n]).square()
            term = (d2 if self._weight is None else self._weight[n] * d2).sum()
            total = term if total is None else total + term
        return 0.5 * total if self.half else total

    @torch.no_grad()
    def add_penalty_grad(self, model: nn.Module) -> Tensor | None:
        """Fused λ·R(θ) and its gradient 2·λ·s·W·(θ − θ̄), added to ``.grad`` with multi-tensor
        (foreach) kernels: the same numbers as autograd on :meth:`penalty`, a fraction of the kernel
        launches (this runs every step)."""
        if not self._anchor:
            return None
        params = list(named_params(model).items())
        scale = self.strength * (0.5 if self.half else 1.0)
        diffs = torch._foreach_sub([p for _, p in params], [self._anchor[n] for n, _ in params])
        weighted = diffs if self._weight is None else torch._foreach_mul(diffs, [self._weight[n] for n, _ in params])
        for _, p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_add_([p.grad for _, p in params], weighted, alpha=2.0 * scale)
        total = torch.stack([torch.dot(w.flatten(), d.flatten()) for w, d in zip(weighted, diffs, strict=True)]).sum()
        if self._const is not None:
            total = total + self._const
        return scale * total
