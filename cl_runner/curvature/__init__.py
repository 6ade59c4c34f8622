"""The curvature of a model's output distribution: per-sample gradients, label choice, Fisher
structures (diag / KFAC / dense) and their estimators. A layer below :mod:`cl_runner.methods`: it
imports torch, :mod:`cl_runner.models.params` and nothing of the methods. Its modules, each importing
only modules listed before it:

- ``layers``: the one layer pass (hooks on Linear/Conv2d: each layer's inputs a and output gradients δ);
- ``labels``: the active output window, the masked log-softmax, the one label chooser
  (:func:`fisher_labels`, a draw needs the caller's ``torch.Generator``) and the scalars to differentiate;
- ``per_sample``: per-sample gradients (layer-pass einsum rows, ``torch.func`` rows and squared sums);
- ``structures``: the representations (:class:`Curvature`: diag, KFAC, dense);
- ``estimators``: diagonal importances (EWC's :func:`fisher_diagonal` with its Linear closed form,
  the seeds' :func:`squared_batch_grad` and :func:`batch_label_cross_mean_sq_grad`, :func:`mas_importance`);
- ``structured``: :func:`fisher`, the Fisher in any representation;
- ``terms``: the penalty Σ_k w_k (θ − θ*_k)ᵀ F_k (θ − θ*_k) over structured Fishers and its state.
"""

from cl_runner.curvature.estimators import (
    BATCH_ESTIMATORS,
    FISHER_ESTIMATORS,
    batch_label_cross_mean_sq_grad,
    diagonal_by_layers,
    fisher_diagonal,
    mas_importance,
    squared_batch_grad,
)
from cl_runner.curvature.labels import FISHER_LABELS, fisher_labels
from cl_runner.curvature.structured import fisher
from cl_runner.curvature.structures import (
    DENSE_LIMIT,
    KINDS,
    Curvature,
    DenseCurvature,
    DiagCurvature,
    KFACCurvature,
    check_dense,
    from_state,
    picture,
)
from cl_runner.curvature.terms import Term, add_penalty_grad, penalty, terms_from_state, terms_state

__all__ = [
    "BATCH_ESTIMATORS",
    "DENSE_LIMIT",
    "FISHER_ESTIMATORS",
    "FISHER_LABELS",
    "KINDS",
    "Curvature",
    "DenseCurvature",
    "DiagCurvature",
    "KFACCurvature",
    "Term",
    "add_penalty_grad",
    "batch_label_cross_mean_sq_grad",
    "check_dense",
    "diagonal_by_layers",
    "fisher",
    "fisher_diagonal",
    "fisher_labels",
    "from_state",
    "mas_importance",
    "penalty",
    "picture",
    "squared_batch_grad",
    "terms_from_state",
    "terms_state",
]
