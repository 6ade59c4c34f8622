"""The Fisher of the model's output distribution in three representations: diagonal, KFAC, dense.

    F = 1/N Σ_n E_c[ g_nc g_ncᵀ ],   g_nc = ∂ log p(c | x_n) / ∂θ

over the trainable parameters θ (``named_params`` order, each tensor flattened row-major), p the
softmax over each sample's active units (``units``, or one range per sample in ``sample_units``
as in ``trainer.task_loss``). ``labels`` picks c: ``true`` = the dataset label (empirical Fisher),
``pred`` = the argmax, ``sample`` = one draw from p (``generator``), ``all`` = the exact expectation
Σ_c p(c|x) g g ᵀ (the true Fisher); :mod:`~cl_runner.curvature.labels` chooses them. Computed in eval
mode (:func:`~cl_runner.models.params.eval_mode`);
parameters, buffers, ``.grad``, training flags and the global RNG are left as found.

Representations (:mod:`~cl_runner.curvature.structures`; :class:`Curvature`: ``quadratic`` δᵀFδ,
``matvec`` Fv, ``solve`` (F + damping·I)⁻¹g, ``add_``/``scale_``, ``to_dense``, ``image``,
``state_dict``/:func:`from_state`):

- ``diag``: F_ii per parameter. Without ``sample_units`` it is exactly EWC's
  :func:`~cl_runner.curvature.estimators.fisher_diagonal` (same code, same numbers).
- ``kfac`` (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions): per ``nn.Linear`` /
  ``nn.Conv2d`` layer one block F_l ≈ G ⊗ A over the layer's [weight | bias] (the bias as an extra
  input column of ones), A = 1/N Σ_n a_n a_nᵀ of the layer inputs, G = 1/N Σ_n E_c[δ_nc δ_ncᵀ] of
  the gradients of log p(c|x_n) w.r.t. the layer's outputs; cross-layer blocks are zero. In the
  row-major order of the weight (out, in), vec(δ aᵀ) = δ ⊗ a, so the block is ``kron(G, A)`` and
  F_l vec(V) = vec(G V A). Convolutions (KFC): a = the expanded patches (``F.unfold``) at each
  output position t of T, and the *spatial sum* convention A = 1/N Σ_n Σ_t a_nt a_ntᵀ,
  G = 1/N Σ_n 1/T Σ_t δ_nt δ_ntᵀ (Grosse & Martens' Ω and Γ; exact when T = 1). Every other
  trainable parameter (batch-norm, a bias without its layer, a grouped convolution) is diagonal.
  Exact for one sample through one linear layer (a is then fixed, so E[δδᵀ ⊗ aaᵀ] = G ⊗ A).
  ``add_`` keeps a sum of Kronecker terms per layer (exact; the per-step cost grows with the
  terms); ``solve`` needs one term per layer and is exact for G ⊗ A + damping·I through the
  eigendecompositions of G and A.
- ``dense``: the full P × P matrix; refused (one line with the parameter count and the limit) above
  ``DENSE_LIMIT`` parameters (20,000: a 1.6 GB float32 matrix; D3's CNN has 2,980). From M
  per-sample gradient rows (M = N, or N·K for ``all``) fewer than P it keeps the factor U (M × P,
  F = UᵀU) instead of the matrix: ``solve`` is then Woodbury, (F + δI)⁻¹g = (g − Uᵀ(δI + UUᵀ)⁻¹Ug)/δ,
  an M × M Cholesky instead of P × P (natural-gradient replay solves every step).

Own hooks, not a library. Per-sample gradients of Linear/Conv2d parameters come from the layer pass
(:mod:`~cl_runner.curvature.layers`: one batched forward with hooks and one backward per class; a
sample's weight gradient is Σ_t δ_t a_tᵀ, an einsum, as BackPACK's batch_grad); models with other
trainable parameters go through ``torch.func`` (:mod:`~cl_runner.curvature.per_sample`). Compared on
this 2-core CPU (shared, load ~13; torch 2.15; a CNN conv5×5→3, pool, conv5×5→3, pool, fc 12→8,
fc 8→5 without bias: 450 parameters, 64 samples of 20×20, labels=all; script in the issue-11 report):

- ours, dense: 0.22 s, relative difference to a brute-force Python loop of per-sample outer products
  6e-16 (float64); KFAC 0.18 s.
- curvlinops-for-pytorch 3.0.1: its GGN (= this Fisher for softmax cross-entropy) agrees (5e-16) but
  is matrix-free: the dense matrix takes P products, 33 s; its KFAC (``fisher_type="type-2"``, the
  "expand" convention) equals ours to 9e-17 in 0.29 s. Depends on scipy, einops, backpack.
- NNGeometry 0.4 (the protocol's library): dense and KFAC agree with ours to 4e-7 in float32 (it
  refuses float64 models), 0.30 s / 0.22 s; single maintainer, last release 2025-04.
- BackPACK 1.7.1 (last release 2024-11): KFLR factors in 0.27 s, after ``extend(model)``; no dense
  Fisher, no solve.

All three install on torch 2.15. None is faster here, none knows the project's per-sample unit
masking (``sample_units``), its ``fisher_labels`` options or the eval-mode/RNG contract, and the
Woodbury solve natural-gradient replay needs every step is ours either way; so no new dependency.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from cl_runner.curvature.estimators import fisher_diagonal
from cl_runner.curvature.labels import FISHER_LABELS, fisher_labels, loglik_picks, window
from cl_runner.curvature.layers import expand, layer_pass, layer_table, per_position
from cl_runner.curvature.per_sample import func_rows, hook_rows
from cl_runner.curvature.structures import (
    KINDS,
    Curvature,
    DenseCurvature,
    DiagCurvature,
    KFACCurvature,
    check_dense,
    unflat,
)
from cl_runner.models.params import eval_mode, named_params


def fisher(
    model: nn.Module,
    x: Tensor,
    units: tuple[int, int],
    *,
    kind: str,
    labels: str,
    y: Tensor | None = None,
    sample_units: Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk: int = 256,
) -> Curvature:
    """The Fisher of ``model``'s output distribution on ``x`` (see the module docstring), as a
    :class:`Curvature` of ``kind`` diag | kfac | dense. ``chunk`` bounds the samples per batched pass
    (per-sample gradient rows held at once by torch.func: ``chunk``, or ``chunk // K`` samples × K
    classes for ``all``); it does not change the result. ``generator``: needed for ``labels=sample``."""
    if kind not in KINDS:
        raise ValueError(f"method.fisher={kind!r} is not valid; choose one of: {', '.join(KINDS)}")
    if labels not in FISHER_LABELS:
        raise ValueError(f"method.fisher_labels={labels!r} is not valid; choose one of: {', '.join(FISHER_LABELS)}")
    params = named_params(model)
    if kind == "dense":
        check_dense(sum(p.numel() for p in params.values()))
    n = len(x)
    with eval_mode(model):
        layers, covered = layer_table(model, params)
        hooks = covered == set(params)  # every parameter in a Linear/Conv2d: per-sample grads by einsum
        if kind == "diag" and sample_units is None and not hooks and (y is not None or labels != "true"):
            # EWC's own diagonal (torch.func): the same numbers as method.fisher=diag
            y0 = y if y is not None else torch.zeros(n, dtype=torch.long, device=x.device)
            return DiagCurvature(fisher_diagonal(model, x, y0, units, labels, chunk, generator))
        lo, hi, mask = window(units, sample_units, n, x.device)
        target = fisher_labels(model, x, y, (lo, hi), labels, generator, mask=mask)
        if kind == "kfac":
            return _kfac(model, params, x, lo, hi, mask, target, chunk)
        names = list(params)
        if hooks:
            rows = hook_rows(model, names, layers, x, lo, hi, mask, target, chunk)
        else:
            rows = func_rows(model, names, x, lo, hi, mask, target, chunk)
        n_rows = n * ((hi - lo) if target is None else 1)
        return _from_rows(kind, rows, params, n, n_rows)


def _from_rows(kind: str, rows: Iterator[Tensor], params: dict[str, Tensor], n: int, n_rows: int) -> Curvature:
    """F = Σ rᵀr / n from per-sample gradient rows: its diagonal, or dense as the matrix, or as the
    factor U = rows / √n when there are fewer rows than parameters (F = UᵀU, Woodbury solve)."""
    shapes = {k: p.shape for k, p in params.items()}
    if kind == "diag":
        acc = sum(r.square().sum(0) for r in rows)
        return DiagCurvature(unflat(acc / max(n, 1), shapes))
    p = sum(math.prod(s) for s in shapes.values())
    if n_rows < p:  # keep the factor: F = UᵀU (Woodbury solve)
        factor = torch.cat([next(iter(params.values())).new_zeros(0, p), *rows]) / math.sqrt(max(n, 1))
        return DenseCurvature(shapes, factor=factor)
    matrix = None
    for r in rows:
        matrix = r.T @ r if matrix is None else matrix.addmm_(r.T, r)
    return DenseCurvature(shapes, matrix=matrix / max(n, 1))


def _kfac(model, names, x, lo, hi, mask, target, chunk) -> KFACCurvature:
    """Per Linear/Conv2d layer A = 1/N Σ a aᵀ and G = 1/N Σ w δ δᵀ / T from the layer pass; the other
    parameters' diagonal from torch.func rows."""
    shapes = {n: p.shape for n, p in names.items()}
    layers, covered = layer_table(model, names)
    acc = {m: [0.0, 0.0] for m in layers}  # Σ a aᵀ, Σ w δ δᵀ / T
    modules = [lay["module"] for lay in layers.values()]
    for inputs, picks in layer_pass(model, modules, x, chunk, loglik_picks(lo, hi, mask, target)):
        for (m, lay), a in zip(layers.items(), inputs, strict=True):
            a = expand(lay["module"], a, lay["bias"] is not None)
            acc[m][0] = acc[m][0] + torch.einsum("bti,btj->ij", a, a)
        for w, grads in picks:
            for m, d in zip(layers, grads, strict=True):
                d = per_position(d)
                acc[m][1] = acc[m][1] + torch.einsum("b,bto,btp->op", w / d.shape[1], d, d)
    n = len(x)
    kfac_layers = {
        m: {"weight": lay["weight"], "bias": lay["bias"], "terms": [(1.0, acc[m][0] / n, acc[m][1] / n)]}
        for m, lay in layers.items()
    }
    others = [k for k in names if k not in covered]
    rest = {k: torch.zeros_like(names[k]) for k in others}
    if others:
        for rows in func_rows(model, others, x, lo, hi, mask, target, chunk):
            for k, v in unflat(rows.square().sum(0), {k: shapes[k] for k in others}).items():
                rest[k] += v / n
    return KFACCurvature(shapes, kfac_layers, rest)
