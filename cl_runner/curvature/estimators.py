"""Diagonal importance estimators of one task: EWC's Fisher (:func:`fisher_diagonal`), the seeds'
squared batch gradients (:func:`squared_batch_grad`, :func:`batch_label_cross_mean_sq_grad`; ``BATCH_ESTIMATORS``)
and MAS's output sensitivity (:func:`mas_importance`).

Each picks the fastest exact path for the model, with the same numbers whichever it takes:

- Linear closed form (:func:`_linear_pass`): when every trainable parameter belongs to an
  ``nn.Linear`` applied once per forward to a (batch, features) input (an MLP without batch-norm
  affine parameters), a per-sample weight gradient is the outer product δ_n a_nᵀ of the layer's
  output gradient and its input, so Σ_n (δ_n a_nᵀ)² = (δ²)ᵀ(a²) and Σ_n |δ_n a_nᵀ| = |δ|ᵀ|a| are one
  matrix product per layer, no per-sample gradient held. δ_n comes from the layer pass
  (:mod:`~cl_runner.curvature.layers`: one batched backward per class for the exact Fisher).
- Per-layer einsum (:func:`diagonal_by_layers`): a model whose parameters all live in
  ``nn.Linear``/``nn.Conv2d`` layers (a CNN without batch norm, e.g. D3's) gets its per-sample
  gradients from the same layer pass, one einsum per layer over the expanded inputs: 2.5–7×
  faster than ``vmap`` on the D3 CNN.
- ``torch.func`` (:mod:`~cl_runner.curvature.per_sample`) for any other model.

``FAST_LINEAR = False`` forces ``torch.func`` (tests and benchmarks compare the paths). Outputs are
restricted to the task's active units ``units = (lo, hi)``; labels come from
:func:`~cl_runner.curvature.labels.fisher_labels` (a draw needs the caller's generator). The caller
puts the model in eval mode (:func:`~cl_runner.models.params.eval_mode`); nothing here touches
``.grad``, the parameters, the buffers or the global RNG.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cl_runner.curvature.labels import fisher_labels, loglik_picks
from cl_runner.curvature.layers import LayerReused, Picker, layer_pass, layer_table
from cl_runner.curvature.per_sample import func_square_sums, hook_rows, single_output, split_state
from cl_runner.curvature.structures import unflat
from cl_runner.models.params import named_params

FISHER_ESTIMATORS = ("per_sample", "squared_batch_grad", "batch_label_cross_mean_sq_grad")
FAST_LINEAR = True  # use the closed form for Linear-only models (tests switch it off to compare)
FAST_CHUNK = 1024  # samples per batched backward in the fast path (activations only in memory)


def fisher_diagonal(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    units: tuple[int, int],
    labels: str = "pred",
    batch: int = 16,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher, mean over the N samples of ``x`` of per-sample squared gradients:

    - labels in true | pred | sample:  F_i = 1/N Σ_n (∂ log p(ŷ_n | x_n) / ∂θ_i)²
    - labels = all (exact expectation): F_i = 1/N Σ_n Σ_c p(c|x_n) (∂ log p(c | x_n) / ∂θ_i)²

    with p the softmax over the active units ``units = (lo, hi)``. Keys are the names of the
    trainable parameters; ``batch`` bounds the number of per-sample gradients held at once
    (``torch.func`` path). ``generator``: needed for ``sample``.
    """
    if len(x) == 0:
        return {n: torch.zeros_like(p) for n, p in split_state(model)[0].items()}
    target = fisher_labels(model, x, y, units, labels, generator)
    if FAST_LINEAR:
        fast = _linear_pass(model, x, units, "all" if labels == "all" else "labels", target)
        if fast is not None:
            return {n: f / len(x) for n, f in fast.items()}
        layered = diagonal_by_layers(model, x, units, target, batch)
        if layered is not None:
            return layered
    return {n: f / len(x) for n, f in func_square_sums(model, x, units, target, batch).items()}


def diagonal_by_layers(
    model: nn.Module, x: Tensor, units: tuple[int, int], target: Tensor | None, chunk: int
) -> dict[str, Tensor] | None:
    """EWC's diagonal Fisher (:func:`fisher_diagonal`: mean per-sample squared gradient of
    log p(target) over ``units``, or the exact expectation when ``target`` is None) from the layers'
    per-sample gradients; None when a parameter lives outside a Linear/Conv2d layer. Rows held at
    once: enough samples for ~16 MB (at least ``chunk``)."""
    params = named_params(model)
    layers, covered = layer_table(model, params)
    if covered != set(params) or not len(x):
        return None
    lo, hi = int(units[0]), int(units[1])
    n_params = sum(p.numel() for p in params.values())
    step = min(len(x), max(chunk, (1 << 22) // max(n_params, 1)))
    shapes = {n: p.shape for n, p in params.items()}
    try:
        acc = sum(r.square().sum(0) for r in hook_rows(model, list(params), layers, x, lo, hi, None, target, step))
    except LayerReused:  # raised by the first chunk's forward, before anything was summed
        return None
    return unflat(acc / len(x), shapes)


# ---- closed form for models whose trainable parameters all sit in nn.Linear layers --------------


def _linear_owners(model: nn.Module) -> list[tuple[str, nn.Linear]] | None:
    """The Linear modules owning every trainable parameter, or None if another module owns one."""
    owners = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(module) is not nn.Linear:
            return None
        owners.append((name, module))
    return owners or None


def _mas_picks(lo: int, hi: int) -> Picker:
    """MAS's scalar: Σ_n ‖f(x_n)‖² over the active units (its per-sample gradients, not squared)."""
    return lambda z, start: [(None, z[:, lo:hi].square().sum())]


def _linear_pass(
    model: nn.Module,
    x: Tensor,
    units: tuple[int, int],
    kind: str,
    target: Tensor | None = None,
    chunk: int = FAST_CHUNK,
) -> dict[str, Tensor] | None:
    """Σ over samples of squared (kind "labels": log p(target|x); "all": p-weighted over classes) or
    absolute (kind "mas": ‖f(x)‖²) per-sample gradients, by the outer-product closed form over the
    layer pass. Returns None when the model does not qualify (the caller then takes another path)."""
    owners = _linear_owners(model)
    if owners is None:
        return None
    lo, hi = units
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    picks = _mas_picks(lo, hi) if kind == "mas" else loglik_picks(lo, hi, None, None if kind == "all" else target)
    try:
        for inputs, grads in layer_pass(model, [m for _, m in owners], x, chunk, picks):
            if any(a.dim() != 2 for a in inputs):
                return None  # a layer on (batch, …, features) inputs: no single outer product
            weights, acts = _closed_form_factors(kind, inputs, grads)
            for (name, module), w, a in zip(owners, weights, acts, strict=True):
                prefix = f"{name}." if name else ""
                if module.weight.requires_grad:
                    acc[prefix + "weight"] += w.T @ a
                if module.bias is not None and module.bias.requires_grad:
                    acc[prefix + "bias"] += w.sum(0)
    except LayerReused:  # a layer used twice: no single outer product per sample
        return None
    return acc


def _closed_form_factors(kind, inputs, grads) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer (W, A) with Σ_n (per-sample gradient)² = Wᵀ A (|·| for MAS): W from the output
    gradients δ (summed over classes with weights p for ``all``), A from the inputs a."""
    if kind == "mas":
        ((_, deltas),) = grads
        return [d.abs() for d in deltas], [a.abs() for a in inputs]  # |δ a| = |δ| |a|
    if kind == "all":
        weights = None
        for p, deltas in grads:  # a loop over classes; the samples are batched
            weights = weights or [torch.zeros_like(d) for d in deltas]
            for w, d in zip(weights, deltas, strict=True):
                w.addcmul_(d.square(), p[:, None])
    else:
        ((_, deltas),) = grads
        weights = [d.square() for d in deltas]
    return weights, [a.square() for a in inputs]


# ---- the seeds' squared batch gradient and MAS ---------------------------------------------------


def squared_batch_grad(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    units: tuple[int, int],
    labels: str = "true",
    batch_size: int = 100,
    n_batches: int = 2,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The seeds' Fisher estimate (PROTOCOLS.md D2), *not* a per-sample Fisher:

        F_i = 1/B Σ_{b<B} ( ∂/∂θ_i  1/|X_b| Σ_{n∈X_b} log p(ŷ_n | x_n) )²

    X_b = samples [b·batch_size, (b+1)·batch_size) of ``x`` in the order given (the first B
    mini-batches, unshuffled; B = min(n_batches, batches available)); ŷ as in
    :func:`fisher_labels` (``all`` has no meaning here). Squaring a batch-mean gradient drops
    the per-sample variance: this is roughly |X_b| times smaller than the per-sample Fisher.
    """
    if labels == "all":
        raise ValueError("fisher_labels=all does not apply to squared_batch_grad; choose one of: true, pred, sample")
    lo, hi = units
    params, consts = split_state(model)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    x, y = x[: batch_size * n_batches], y[: batch_size * n_batches]
    if len(x) == 0:
        return fisher
    target = fisher_labels(model, x, y, units, labels, generator)

    def mean_log_lik(params: dict[str, Tensor], xb: Tensor, cb: Tensor) -> Tensor:
        z = functional_call(model, (params, consts), (xb,))[:, lo:hi]
        return torch.log_softmax(z, 1).gather(1, cb.unsqueeze(1)).mean()

    batch_grad = grad(mean_log_lik)
    used = 0
    for s in range(0, len(x), batch_size):
        for name, g in batch_grad(params, x[s : s + batch_size], target[s : s + batch_size]).items():
            fisher[name] += g.square()
        used += 1
    return {n: f / used for n, f in fisher.items()}


def batch_label_cross_mean_sq_grad(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    units: tuple[int, int],
    labels: str = "true",
    batch_size: int = 100,
    n_batches: int = 2,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The seeds' EWC trade-off notebook's estimate (PROTOCOLS.md D2, its ``_update_fisher_params``),
    *not* a Fisher: the square of the gradient of one scalar,

        L = 1/Σ_b |X_b|² · Σ_{b<B} Σ_{n∈X_b} Σ_{m∈X_b} log p(ŷ_m | x_n),     F_i = (∂L/∂θ_i)²

    X_b as in :func:`squared_batch_grad` (the first B mini-batches of ``batch_size`` in data order).
    The notebook indexes a batch's log-softmax (|X_b| × K) with the batch's whole label vector,
    ``logp[:, target]``: an |X_b| × |X_b| matrix holding *every* sample's log-probability of *every*
    label present in the batch, not one entry per sample; it stacks the B matrices, averages all their
    entries into L, differentiates L once and squares that gradient. Per sample this is the
    log-likelihood of the batch's label histogram (≈ the mean over the classes of log p(c|x) with
    balanced classes), whose gradient stays large at a trained model, unlike a true-label batch gradient.
    ŷ: ``labels`` true (the notebook's) | pred | sample, as :func:`fisher_labels` (not ``all``).
    """
    if labels == "all":
        raise ValueError(
            "fisher_labels=all does not apply to batch_label_cross_mean_sq_grad; choose one of: true, pred, sample"
        )
    lo, hi = units
    params, consts = split_state(model)
    x, y = x[: batch_size * n_batches], y[: batch_size * n_batches]
    if len(x) == 0:
        return {n: torch.zeros_like(p) for n, p in params.items()}
    target = fisher_labels(model, x, y, units, labels, generator)

    def cross_mean(params: dict[str, Tensor]) -> Tensor:
        blocks = []
        for s in range(0, len(x), batch_size):
            logp = torch.log_softmax(functional_call(model, (params, consts), (x[s : s + batch_size],))[:, lo:hi], 1)
            blocks.append(logp[:, target[s : s + batch_size]].reshape(-1))  # (|X_b| · |X_b|,)
        return torch.cat(blocks).mean()

    return {n: g.square() for n, g in grad(cross_mean)(params).items()}


#: EWC's ``fisher_estimator`` values other than ``per_sample``: a squared gradient of a batch statistic
BATCH_ESTIMATORS = {
    "squared_batch_grad": squared_batch_grad,
    "batch_label_cross_mean_sq_grad": batch_label_cross_mean_sq_grad,
}


def mas_importance(
    model: nn.Module,
    x: Tensor,
    units: tuple[int, int],
    per_sample: bool = True,
    batch: int = 64,
) -> dict[str, Tensor]:
    """MAS importance of one task (no labels needed), outputs restricted to ``units = (lo, hi)``:

    - per_sample=True (Aljundi et al. 2018, eq. 2–4): Ω_i = 1/N Σ_n | ∂ ‖f(x_n)‖²₂ / ∂θ_i |
    - per_sample=False (Hsu et al. 2018's code): Ω_i = 1/B Σ_b | ∂ mean(f(X_b)²) / ∂θ_i |, the mean
      over the B mini-batches X_b of ``batch`` samples of the absolute gradient of the mean of the
      squared logits (mean over samples and units of the batch).
    """
    lo, hi = units
    params, consts = split_state(model)
    imp = {n: torch.zeros_like(p) for n, p in params.items()}
    if len(x) == 0:
        return imp
    if per_sample:
        fast = _linear_pass(model, x, units, "mas") if FAST_LINEAR else None
        if fast is not None:
            return {n: v / len(x) for n, v in fast.items()}
        out = single_output(model, consts, lo, hi)

        def sq_norm(params: dict[str, Tensor], x1: Tensor) -> Tensor:
            return out(params, x1).square().sum()

        grads = vmap(grad(sq_norm), in_dims=(None, 0))
        for s in range(0, len(x), batch):
            for name, g in grads(params, x[s : s + batch]).items():
                imp[name] += g.abs_().sum(0)
        return {n: v / len(x) for n, v in imp.items()}

    def mean_sq(params: dict[str, Tensor], xb: Tensor) -> Tensor:
        return functional_call(model, (params, consts), (xb,))[:, lo:hi].square().mean()

    batch_grad = grad(mean_sq)
    n_batches = 0
    for s in range(0, len(x), batch):
        for name, g in batch_grad(params, x[s : s + batch]).items():
            imp[name] += g.abs()
        n_batches += 1
    return {n: v / n_batches for n, v in imp.items()}
