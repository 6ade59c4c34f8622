"""Per-sample gradients of log p(c|x): by the layer pass (one einsum per Linear/Conv2d layer) or by
``torch.func`` (any model), as rows r with F = Σ rᵀr / N, or summed squares for a diagonal.

``torch.func`` runs the model through ``functional_call`` with its parameters *detached* and its
buffers passed as constants, so it never touches ``.grad``, the parameters or the buffers. The caller
puts the model in eval mode: batch norm then uses its running statistics and dropout is off, so a
sample's output does not depend on the other samples of its chunk and ``vmap`` over samples is exact.
Per-sample gradients are materialized (one copy of the parameters per sample), so the work is split
into chunks of ``chunk``/``batch`` per-sample gradients (for the exact expectation, ``target`` None,
``chunk // K`` samples × K classes). The Linear-only closed form that holds no per-sample gradient
is :func:`cl_runner.curvature.estimators._linear_pass`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from cl_runner.curvature.labels import log_softmax, loglik_picks
from cl_runner.curvature.layers import expand, layer_pass, per_position


def split_state(model: nn.Module, names: Iterable[str] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(parameters: the trainable ones, or those in ``names``; everything else: other parameters and
    buffers), all detached."""
    names = None if names is None else set(names)
    params, consts = {}, {}
    for n, p in model.named_parameters():
        (params if (p.requires_grad if names is None else n in names) else consts)[n] = p.detach()
    for n, b in model.named_buffers():
        consts[n] = b.detach()
    return params, consts


def single_output(model: nn.Module, consts: dict[str, Tensor], lo: int, hi: int) -> Callable:
    """f(params, x) -> the active logits (K,) of one sample x (no batch dimension)."""

    def logits(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, (params, consts), (x.unsqueeze(0),))[0, lo:hi]

    return logits


def func_square_sums(
    model: nn.Module, x: Tensor, units: tuple[int, int], target: Tensor | None, batch: int
) -> dict[str, Tensor]:
    """Σ_n (∂ log p(target_n|x_n)/∂θ)², or Σ_n Σ_c p(c|x_n) (∂ log p(c|x_n)/∂θ)² when ``target`` is
    None, per trainable parameter, by ``torch.func`` (``batch`` per-sample gradients at once)."""
    lo, hi = units
    params, consts = split_state(model)
    out = single_output(model, consts, lo, hi)
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    if target is None:

        def log_probs(params: dict[str, Tensor], x1: Tensor) -> Tensor:
            return torch.log_softmax(out(params, x1), -1)

        jac = vmap(jacrev(log_probs), in_dims=(None, 0))
        step = max(1, batch // (hi - lo))
        for s in range(0, len(x), step):
            xb = x[s : s + step]
            with torch.no_grad():
                p = torch.softmax(model(xb)[:, lo:hi], 1)  # (B, K), the expectation's weights
            w = p.reshape(1, -1)
            for name, j in jac(params, xb).items():  # j: (B, K, *shape)
                # Σ_b Σ_c p_bc j_bc² as one matrix product (squared in place: j is ours and large)
                sums[name] += (w @ j.reshape(w.shape[1], -1).square_()).reshape(sums[name].shape)
        return sums

    def log_lik(params: dict[str, Tensor], x1: Tensor, c: Tensor) -> Tensor:
        return torch.log_softmax(out(params, x1), -1).gather(0, c.unsqueeze(0))[0]

    per_sample = vmap(grad(log_lik), in_dims=(None, 0, 0))
    for s in range(0, len(x), batch):
        for name, g in per_sample(params, x[s : s + batch], target[s : s + batch]).items():
            sums[name] += g.square_().sum(0)  # in place: g is ours and large
    return sums


def func_rows(model, names, x, lo, hi, mask, target, chunk) -> Iterator[Tensor]:
    """Per-sample gradient rows r (B·K or B, P_names) of log p, weighted so that F = Σ rᵀr / N,
    chunk by chunk, by torch.func (the parameters in ``names`` detached, the others constants)."""
    params, consts = split_state(model, names)

    def logp(params, x1, m1):
        z = functional_call(model, (params, consts), (x1.unsqueeze(0),))[0, lo:hi]
        return log_softmax(z, m1)

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
                p = log_softmax(model(xb)[:, lo:hi], mb).exp()
            j = jac(params, xb, mb)
            rows = torch.cat([j[n].reshape(len(xb), hi - lo, -1) for n in names], 2)
            yield (p.sqrt()[:, :, None] * rows).reshape(len(xb) * (hi - lo), -1)
    else:
        one = vmap(grad(loglik), in_dims=(None, 0, mdim, 0))
        for s in range(0, len(x), chunk):
            mb = None if mask is None else mask[s : s + chunk]
            g = one(params, x[s : s + chunk], mb, target[s : s + chunk])
            yield torch.cat([g[n].reshape(len(g[n]), -1) for n in names], 1)


def hook_rows(
    model: nn.Module, names: list[str], layers: Mapping[str, dict], x, lo, hi, mask, target, chunk
) -> Iterator[Tensor]:
    """Per-sample gradient rows (B, P) of every Linear/Conv2d parameter in ``names`` order, weighted by
    √w (F = Σ rᵀr / N), from the layer pass: a sample's weight gradient is Σ_t δ_t a_tᵀ (BackPACK's
    batch_grad), one einsum per layer instead of a per-sample backward. Raises LayerReused."""
    table = list(layers.values())
    modules, picker = [lay["module"] for lay in table], loglik_picks(lo, hi, mask, target)
    for inputs, picks in layer_pass(model, modules, x, chunk, picker):
        acts = [expand(lay["module"], a, lay["bias"] is not None) for lay, a in zip(table, inputs, strict=True)]
        for w, grads in picks:
            out = {}
            for lay, a, d in zip(table, acts, grads, strict=True):
                g = torch.einsum("bto,bti->boi", per_position(d) * w.sqrt()[:, None, None], a)
                if lay["bias"] is None:
                    out[lay["weight"]] = g.flatten(1)
                else:
                    out[lay["weight"]], out[lay["bias"]] = g[:, :, :-1].flatten(1), g[:, :, -1]
            yield torch.cat([out[n] for n in names], 1)
