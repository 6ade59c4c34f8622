"""Label choice."""

from __future__ import annotations

import torch
from torch import Tensor, nn

FISHER_LABELS = ("true", "pred", "sample", "all")


@torch.no_grad()
def _active_logits(model: nn.Module, x: Tensor, lo: int, hi: int, batch: int) -> Tensor:
    """Batched forward (eval mode is the caller's job), logits of units [lo, hi)."""
    return torch.cat([model(x[s : s + batch])[:, lo:hi] for s in range(0, len(x), batch)])


def fisher_labels(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    units: tuple[int, int],
    labels: str,
    generator: torch.Generator | None = None,
    batch: int = 1024,
) -> Tensor:
    """Label (relative to ``lo``) whose log-likelihood gradient enters the Fisher, per sample.

    true: the dataset label ``y - lo`` (empirical Fisher); pred: argmax of the active logits;
    sample: one draw from the model's softmax over the active units (one multinomial call on the
    CPU with ``generator``).
    """
    lo, hi = units
    if labels == "true":
        return y - lo
    z = _active_logits(model, x, lo, hi, batch)
    if labels == "pred":
        return z.argmax(1)
    if labels == "sample":
        p = torch.softmax(z.double(), 1).cpu()
        return torch.multinomial(p, 1, generator=generator).squeeze(1).to(x.device)
    raise ValueError(f"method.fisher_labels={labels!r} is not valid; choose one of: {', '.join(FISHER_LABELS)}")


def _window(units, sample_units, n: int, device) -> tuple[int, int, Tensor | None]:
    """The output window [lo, hi) covering every sample's units, and the (n, hi − lo) mask of each
    sample's own units inside it (None: all samples share the window)."""
    if sample_units is None:
        return int(units[0]), int(units[1]), None
    su = sample_units.to(device)
    lo, hi = int(su[:, 0].min()), int(su[:, 1].max())
    unit = torch.arange(lo, hi, device=device)
    return lo, hi, (unit >= su[:, :1]) & (unit < su[:, 1:])


def _log_softmax(z: Tensor, mask: Tensor | None) -> Tensor:
    return torch.log_softmax(z if mask is None else z.masked_fill(~mask, float("-inf")), -1)


@torch.no_grad()
def _targets(model, x, y, lo, hi, mask, labels, generator, chunk) -> Tensor | None:
    """Class index (relative to lo) per sample for true/pred/sample; None for all."""
    if labels == "all":
        return None
    if labels == "true":
        if y is None:
            raise ValueError("fisher labels=true needs y")
        return y - lo
    logp = torch.cat(
        [
            _log_softmax(model(x[s : s + chunk])[:, lo:hi], None if mask is None else mask[s : s + chunk])
            for s in range(0, len(x), chunk)
        ]
    )
    if labels == "pred":
        return logp.argmax(1)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return torch.multinomial(logp.double().exp().cpu(), 1, generator=generator).squeeze(1).to(x.device)
