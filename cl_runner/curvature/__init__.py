"""Curvature: per-sample gradients, label choice, Fisher structures (diag / KFAC / dense) and their
estimators. A layer below :mod:`cl_runner.methods` (it imports torch, the models' parameter helpers
and the seeding module, never a method)."""

from cl_runner.curvature.estimators import (
    FISHER_ESTIMATORS,
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
