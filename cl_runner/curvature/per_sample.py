"""Per-sample gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from cl_runner.curvature.labels import _log_softmax
from cl_runner.curvature.layers import _layer_pass


def split_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(trainable parameters, everything else: frozen parameters and buffers), all detached."""
    params, consts = {}, {}
    for n, p in model.named_parameters():
        (params if p.requires_grad else consts)[n] = p.detach()
    for n, b in model.named_buffers():
        consts[n] = b.detach()
    return params, consts


def _single_output(model: nn.Module, consts: dict[str, Tensor], lo: int, hi: int) -> Callable:
    """f(params, x) -> the active logits (K,) of one sample x (no batch dimension)."""

    def logits(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, (params, consts), (x.unsqueeze(0),))[0, lo:hi]

    return logits


def _sample_rows(model, names, x, lo, hi, mask, target, chunk):
    """Per-sample gradient rows r (B·K or B, P_names) of log p, weighted so that F = Σ rᵀr / N,
    chunk by chunk, by torch.func (parameters detached, the others constants)."""
    params, consts = {}, {}
    for n, p in model.named_parameters():
        (params if n in names else consts)[n] = p.detach()
    for n, b in model.named_buffers():
        consts[n] = b.detach()

    def logp(params, x1, m1):
        z = functional_call(model, (params, consts), (x1.unsqueeze(0),))[0, lo:hi]
        return _log_softmax(z, m1)

    def loglik(params, x1, m1, c):
        return logp(params, x1, m1).gather(0, c.unsqueeze(0))[0]

    # the mask is vmapped with the samples when there is one, else a constant None
    mdim = None if mask is None else 0
    if target is None:
        jac = vmap(jacrev(logp), in_dims=(None, 0, mdim))
        step = max(1, chunk // (hi - lo))
        for s in range(0, len(x), step):
            xb = x[s : s + step]
            mb = None if mask is None else mask[s : s + step]
            with torch.no_grad():
                p = _log_softmax(model(xb)[:, lo:hi], mb).exp()
            j = jac(params, xb, mb)
            rows = torch.cat([j[n].reshape(len(xb), hi - lo, -1) for n in names], 2)
            yield (p.sqrt()[:, :, None] * rows).reshape(len(xb) * (hi - lo), -1)
    else:
        one = vmap(grad(loglik), in_dims=(None, 0, mdim, 0))
        for s in range(0, len(x), chunk):
            mb = None if mask is None else mask[s : s + chunk]
            g = one(params, x[s : s + chunk], mb, target[s : s + chunk])
            yield torch.cat([g[n].reshape(len(g[n]), -1) for n in names], 1)


def _hook_rows(model, names, layers, x, lo, hi, mask, target, chunk):
    """Per-sample gradient rows (B, P) of every Linear/Conv2d parameter in ``names`` order, weighted by
    √w (F = Σ rᵀr / N): a sample's weight gradient is Σ_t δ_t a_tᵀ (BackPACK's batch_grad), one einsum
    per layer instead of a per-sample backward."""
    for _, acts, w, deltas in _layer_pass(model, layers, x, lo, hi, mask, target, chunk):
        out = {}
        for lay, a, d in zip(layers.values(), acts, deltas, strict=True):
            g = torch.einsum("bto,bti->boi", d * w.sqrt()[:, None, None], a)
            if lay["bias"] is None:
                out[lay["weight"]] = g.flatten(1)
            else:
                out[lay["weight"]], out[lay["bias"]] = g[:, :, :-1].flatten(1), g[:, :, -1]
        yield torch.cat([out[n] for n in names], 1)
