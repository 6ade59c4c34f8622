"""Continual-learning metrics computed from the accuracy matrix.

Notation: T tasks; ``R[i][j]`` = test accuracy on task j after training tasks 0..i (rows = time,
columns = tasks); ``b[j]`` = accuracy on task j of the *initial* model, before any training.

- ACC (average accuracy, Lopez-Paz & Ranzato 2017):  ACC = 1/T Σ_j R[T-1, j]
- BWT (backward transfer, ibid.):  BWT = 1/(T-1) Σ_{j<T-1} (R[T-1, j] − R[j, j])
  Negative BWT = forgetting.
- FWT (forward transfer, ibid.):   FWT = 1/(T-1) Σ_{j≥1} (R[j-1, j] − b[j])
  Accuracy on a task just before training it, against the same initial model's accuracy on it.
- Forgetting (Chaudhry et al. 2018, RWalk, eq. 2):
  f_j = max_{l ∈ 0..T-2} R[l, j] − R[T-1, j],  forgetting = 1/(T-1) Σ_{j<T-1} f_j
  (the last task is excluded: it cannot have been forgotten yet).
- Learning accuracy (plasticity; Riemer et al. 2019):  LA = 1/T Σ_j R[j, j]
- Intransigence (Chaudhry et al. 2018, RWalk, eq. 3), opt-in: needs the matrix ``J`` of a reference
  model trained *jointly* on tasks 0..k at stage k (``method=joint method.mode=cumulative``, same
  stream, seed and settings):  I_k = J[k, k] − R[k, k],  intransigence = 1/T Σ_k I_k
  (positive = the method learns new tasks worse than joint training would; the counterpart of
  forgetting). The sweep summary computes it when the sweep holds the joint reference jobs.

With a single task, BWT, FWT and forgetting are undefined and returned as None.
"""

from __future__ import annotations

from typing import Sequence

Matrix = Sequence[Sequence[float]]


def _check(R: Matrix) -> int:
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError(f"accuracy matrix must be square and non-empty, got {[len(r) for r in R]}")
    return T


def average_accuracy(R: Matrix) -> float:
    T = _check(R)
    return sum(R[T - 1]) / T


def backward_transfer(R: Matrix) -> float | None:
    T = _check(R)
    if T < 2:
        return None
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def forward_transfer(R: Matrix, initial: Sequence[float]) -> float | None:
    T = _check(R)
    if T < 2:
        return None
    if len(initial) != T:
        raise ValueError(f"initial accuracies must have {T} entries, got {len(initial)}")
    return sum(R[j - 1][j] - initial[j] for j in range(1, T)) / (T - 1)


def forgetting(R: Matrix) -> float | None:
    T = _check(R)
    if T < 2:
        return None
    return sum(max(R[l][j] for l in range(T - 1)) - R[T - 1][j] for j in range(T - 1)) / (T - 1)


def learning_accuracy(R: Matrix) -> float:
    T = _check(R)
    return sum(R[j][j] for j in range(T)) / T


def intransigence(R: Matrix, joint: Matrix) -> float:
    """1/T Σ_k (J[k][k] − R[k][k]): how much worse than the joint reference ``joint`` (J, trained on
    tasks 0..k together at stage k) the method is on task k right after learning it (Chaudhry et al.
    2018, eq. 3; averaged over all T tasks, the first included)."""
    T = _check(R)
    if _check(joint) != T:
        raise ValueError(f"the joint reference matrix has {len(joint)} tasks, the run {T}")
    return sum(joint[k][k] - R[k][k] for k in range(T)) / T


def all_metrics(R: Matrix, initial: Sequence[float]) -> dict[str, float | None]:
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, initial),
        "forgetting": forgetting(R),
        "learning_accuracy": learning_accuracy(R),
    }
