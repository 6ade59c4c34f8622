"""Per-sample gradients with ``torch.func`` for the importance passes (EWC Fisher, MAS).

Every function here runs the model through ``functional_call`` with its parameters *detached*
and its buffers passed as constants, so it never touches ``.grad``, the parameters or the buffers.
The caller puts the model in eval mode (:func:`~cl_runner.methods.base.eval_mode`): BatchNorm then
uses its running statistics (nothing is updated) and dropout is off, so a sample's output does not
depend on the other samples in its chunk and ``vmap`` over samples is exact.

Chunking: per-sample gradients are materialized, one full copy of the parameters per sample, so
the work is split into chunks of at most ``batch`` per-sample gradient vectors (for the exact
Fisher, ``labels="all"``, a chunk holds ``batch // K`` samples × ``K`` classes).

Fast path, same numbers: when every trainable parameter belongs to an ``nn.Linear`` applied once
per forward to a (batch, features) input (an MLP without batch-norm affine parameters), a
per-sample weight gradient is the outer product δ_n a_nᵀ of the layer's output gradient δ_n and
its input a_n, so Σ_n (δ_n a_nᵀ)² = (δ²)ᵀ(a²) and Σ_n |δ_n a_nᵀ| = |δ|ᵀ|a| are computed as one matrix
product per layer without materializing the per-sample gradients. δ_n comes from one batched
backward to the layer outputs (samples do not interact in eval mode), once per class for the
exact Fisher. A model whose parameters all live in ``nn.Linear``/``nn.Conv2d`` layers (a CNN
without batch norm, e.g. D3's) gets its per-sample gradients the same way, one einsum per layer
over the layer's expanded inputs (``curvature._hook_rows``) instead of ``vmap``: 2.5–7× faster on
the D3 CNN. Any other model uses ``torch.func``. ``FAST_LINEAR = False`` forces ``torch.func``.

Outputs are restricted to the active units ``[lo, hi)`` of the task; labels are ``y - lo``.
Random choices (sampled labels, subsets) draw from a caller-supplied ``torch.Generator`` on the
CPU, never from the global RNG.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from cl_runner.curvature.labels import fisher_labels
from cl_runner.curvature.layers import LayerReused, _layer_table
from cl_runner.curvature.per_sample import _hook_rows, _single_output, split_state
from cl_runner.curvature.structures import _unflat
from cl_runner.models.params import named_params

FISHER_ESTIMATORS = ("per_sample", "squared_batch_grad")
FAST_LINEAR = True  # use the closed form for Linear-only models (tests switch it off to compare)
FAST_CHUNK = 1024  # samples per batched backward in the fast path (activations only in memory)


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


def _grads(scalar: Tensor, outs: list[Tensor], retain_graph: bool = False) -> list[Tensor]:
    """∂scalar/∂out per layer output, zeros for a layer that does not reach the active outputs."""
    grads = torch.autograd.grad(scalar, outs, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads, strict=True)]


def _linear_pass(
    model: nn.Module,
    x: Tensor,
    units: tuple[int, int],
    kind: str,
    target: Tensor | None = None,
    chunk: int = FAST_CHUNK,
) -> dict[str, Tensor] | None:
    """Σ over samples of squared (kind "labels": log p(target|x); "all": p-weighted over classes) or
    absolute (kind "mas": ‖f(x)‖²) per-sample gradients, by the outer-product closed form.
    Returns None when the model does not qualify (the caller then uses torch.func)."""
    owners = _linear_owners(model)
    if owners is None:
        return None
    lo, hi = units
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in trainable.items()}
    for s in range(0, len(x), chunk):
        seen: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name, _ in owners}

        def record(module, inp, out, name, seen=seen):  # this chunk's `seen`
            seen[name].append((inp[0].detach(), out))
            return out.clone()  # later in-place ops (ReLU(inplace=True)) act on the copy, not on `out`

        hooks = [
            module.register_forward_hook(lambda m, inp, out, name=name: record(m, inp, out, name))
            for name, module in owners
        ]
        try:
            with torch.enable_grad():
                z = model(x[s : s + chunk])[:, lo:hi]
        finally:
            for h in hooks:
                h.remove()
        if any(len(v) != 1 or v[0][0].dim() != 2 for v in seen.values()):
            return None  # a layer used twice or on (batch, …, features) inputs: no outer product
        acts = [seen[name][0][0] for name, _ in owners]
        outs = [seen[name][0][1] for name, _ in owners]
        if kind == "mas":
            deltas = _grads(z.square().sum(), outs)
            weights = [d.abs() for d in deltas]  # |δ a| = |δ| |a|
            acts = [a.abs() for a in acts]
        else:
            logp = torch.log_softmax(z, 1)
            if kind == "all":
                p = logp.detach().exp()
                weights = [torch.zeros_like(o) for o in outs]
                for c in range(hi - lo):  # a loop over classes; the samples are batched
                    deltas = _grads(logp[:, c].sum(), outs, retain_graph=c < hi - lo - 1)
                    for w, d in zip(weights, deltas, strict=True):
                        w.addcmul_(d.square(), p[:, c : c + 1])
            else:
                deltas = _grads(logp.gather(1, target[s : s + chunk, None]).sum(), outs)
                weights = [d.square() for d in deltas]
            acts = [a.square() for a in acts]
        for (name, module), w, a in zip(owners, weights, acts, strict=True):
            prefix = f"{name}." if name else ""
            if module.weight.requires_grad:
                acc[prefix + "weight"] += w.T @ a
            if module.bias is not None and module.bias.requires_grad:
                acc[prefix + "bias"] += w.sum(0)
    return acc


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
    trainable parameters; ``batch`` bounds the number of per-sample gradients held at once.
    """
    lo, hi = units
    params, consts = split_state(model)
    out = _single_output(model, consts, lo, hi)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    n_samples = len(x)
    if n_samples == 0:
        return fisher

    if FAST_LINEAR:
        target = None if labels == "all" else fisher_labels(model, x, y, units, labels, generator)
        fast = _linear_pass(model, x, units, "all" if labels == "all" else "labels", target)
        if fast is not None:
            return {n: f / n_samples for n, f in fast.items()}
        layered = diagonal_by_layers(model, x, units, target, batch)
        if layered is not None:
            return layered

    if labels == "all":

        def log_probs(params: dict[str, Tensor], x1: Tensor) -> Tensor:
            return torch.log_softmax(out(params, x1), -1)

        jac = vmap(jacrev(log_probs), in_dims=(None, 0))
        k = hi - lo
        step = max(1, batch // k)
        for s in range(0, n_samples, step):
            xb = x[s : s + step]
            with torch.no_grad():
                p = torch.softmax(model(xb)[:, lo:hi], 1)  # (B, K), the expectation's weights
            w = p.reshape(1, -1)
            for name, j in jac(params, xb).items():  # j: (B, K, *shape)
                # Σ_b Σ_c p_bc j_bc² as one matrix product (squared in place: j is ours and large)
                fisher[name] += (w @ j.reshape(w.shape[1], -1).square_()).reshape(fisher[name].shape)
    else:
        if not FAST_LINEAR:  # else the labels were drawn above (one draw per sample, not two)
            target = fisher_labels(model, x, y, units, labels, generator)

        def log_lik(params: dict[str, Tensor], x1: Tensor, c: Tensor) -> Tensor:
            return torch.log_softmax(out(params, x1), -1).gather(0, c.unsqueeze(0))[0]

        per_sample = vmap(grad(log_lik), in_dims=(None, 0, 0))
        for s in range(0, n_samples, batch):
            for name, g in per_sample(params, x[s : s + batch], target[s : s + batch]).items():
                fisher[name] += g.square_().sum(0)  # in place: g is ours and large
    return {n: f / n_samples for n, f in fisher.items()}


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
        out = _single_output(model, consts, lo, hi)

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


def diagonal_by_layers(
    model: nn.Module, x: Tensor, units: tuple[int, int], target: Tensor | None, chunk: int
) -> dict[str, Tensor] | None:
    """EWC's diagonal Fisher (``per_sample.fisher_diagonal``: mean per-sample squared gradient of
    log p(target) over ``units``, or the exact expectation when ``target`` is None) from the layers'
    per-sample gradients; None when a parameter lives outside a Linear/Conv2d layer. Rows held at
    once: enough samples for ~16 MB (at least ``chunk``)."""
    params = named_params(model)
    layers, covered = _layer_table(model, params)
    if covered != set(params) or not len(x):
        return None
    lo, hi = int(units[0]), int(units[1])
    n_params = sum(p.numel() for p in params.values())
    step = min(len(x), max(chunk, (1 << 22) // max(n_params, 1)))
    shapes = {n: p.shape for n, p in params.items()}
    try:
        acc = sum(r.square().sum(0) for r in _hook_rows(model, list(params), layers, x, lo, hi, None, target, step))
    except LayerReused:  # raised by the first chunk's forward, before anything was summed
        return None
    return _unflat(acc / len(x), shapes)
