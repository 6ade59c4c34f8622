"""Which outputs and which labels enter a Fisher: the active output window (one range for all samples,
or one per sample as a mask), the masked log-softmax over it, the label of each sample
(:func:`fisher_labels`, the one chooser), and the scalars whose gradients the layer pass takes
(:func:`loglik_picks`).

Labels (``FISHER_LABELS``): ``true`` = the dataset label (empirical Fisher), ``pred`` = the argmax
of the active logits, ``sample`` = one draw from the softmax over the active units, ``all`` = every
class, weighted by p(c|x) (the exact expectation; no label is chosen). A draw always comes from the
caller's ``torch.Generator`` (seeded from the run's seed and the task, or a method's own stream):
there is no fallback to the global RNG or to a fixed seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cl_runner.curvature.layers import Pick, Picker

FISHER_LABELS = ("true", "pred", "sample", "all")


def window(units, sample_units: Tensor | None, n: int, device) -> tuple[int, int, Tensor | None]:
    """The output window [lo, hi) covering every sample's units, and the (n, hi − lo) mask of each
    sample's own units inside it (None: all samples share the window ``units``)."""
    if sample_units is None:
        return int(units[0]), int(units[1]), None
    su = sample_units.to(device)
    lo, hi = int(su[:, 0].min()), int(su[:, 1].max())
    unit = torch.arange(lo, hi, device=device)
    return lo, hi, (unit >= su[:, :1]) & (unit < su[:, 1:])


def log_softmax(z: Tensor, mask: Tensor | None) -> Tensor:
    """log p over the last dimension, units outside ``mask`` (when given) excluded (p = 0)."""
    return torch.log_softmax(z if mask is None else z.masked_fill(~mask, float("-inf")), -1)


@torch.no_grad()
def fisher_labels(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    units: tuple[int, int],
    labels: str,
    generator: torch.Generator | None,
    *,
    mask: Tensor | None = None,
    batch: int = 1024,
) -> Tensor | None:
    """Label (relative to ``lo``, ``units = (lo, hi)``) whose log-likelihood gradient enters the
    Fisher, per sample; None for ``all``.

    true: ``y - lo``; pred: argmax of the active logits; sample: one draw from the softmax over the
    active units (in float64, one multinomial call on the CPU with ``generator``). ``mask`` (n, hi − lo)
    restricts each sample to its own units. ``generator`` is a required argument: it must be a
    ``torch.Generator`` for ``sample`` (ValueError otherwise); the other labels draw nothing.
    Logits are computed in chunks of ``batch`` samples (eval mode is the caller's job).
    """
    lo, hi = units
    if labels not in FISHER_LABELS:
        raise ValueError(f"method.fisher_labels={labels!r} is not valid; choose one of: {', '.join(FISHER_LABELS)}")
    if labels == "all":
        return None
    if labels == "true":
        if y is None:
            raise ValueError("fisher_labels=true needs the dataset labels y")
        return y - lo
    if labels == "sample" and not isinstance(generator, torch.Generator):
        raise ValueError("fisher_labels=sample draws from the caller's torch.Generator; none was given")
    z = torch.cat([model(x[s : s + batch])[:, lo:hi] for s in range(0, len(x), batch)])
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf"))
    if labels == "pred":
        return z.argmax(1)
    p = torch.softmax(z.double(), 1).cpu()
    return torch.multinomial(p, 1, generator=generator).squeeze(1).to(x.device)


def loglik_picks(lo: int, hi: int, mask: Tensor | None, target: Tensor | None) -> Picker:
    """The layer pass's scalars for a Fisher over units [lo, hi): for a chunk's logits z, per class c
    (p(c|x), Σ_n log p(c|x_n)) when ``target`` is None (the exact expectation), else one
    (1, Σ_n log p(target_n|x_n)) (``target`` relative to lo, from :func:`fisher_labels`)."""

    def picks(z: Tensor, start: int) -> Sequence[Pick]:
        end = start + len(z)
        logp = log_softmax(z[:, lo:hi], None if mask is None else mask[start:end])
        if target is None:
            p = logp.detach().exp()
            return [(p[:, c], logp[:, c].sum()) for c in range(hi - lo)]
        return [(torch.ones_like(logp[:, 0]).detach(), logp.gather(1, target[start:end, None]).sum())]

    return picks
