"""EWC, Elastic Weight Consolidation (Kirkpatrick et al. 2017, eq. 3), one penalty per past task:

    L(θ) = L_t(θ) + λ · s · Σ_{k<t} Σ_i F_k,i (θ_i − θ*_k,i)²,    s = ½ if ``half`` else 1

- θ*_k: the parameters at the end of task k; F_k: the diagonal Fisher computed right then, at
  θ*_k, on task k's training data (all of it, or a seeded subset of ``fisher_samples``).
- Memory grows with the number of tasks: one anchor and one Fisher (each the size of the model)
  per past task are kept (online EWC keeps one). The per-step cost does not grow: the terms are
  merged into one quadratic with the same value and gradient (``regularizer.QuadraticPenalty``).
- Fisher (``cl_runner.curvature.fisher_diagonal``): mean over samples of *per-sample*
  squared gradients of log p(ŷ|x) (never a squared mini-batch gradient), p = softmax over the
  task's active units ``task.units`` (its head in task-IL, the seen classes in class-IL), in eval
  mode. ``fisher_labels`` picks ŷ: ``true`` = dataset label (empirical Fisher), ``pred`` = the
  model's argmax (Hsu et al.; van de Ven & Tolias), ``sample`` = a draw from p(·|x), ``all`` = the
  exact expectation Σ_c p(c|x) (∂ log p(c|x)/∂θ)².
- ``fisher_estimator=squared_batch_grad`` is the seeds' deviation (PROTOCOLS.md D2), kept only to
  reproduce that demonstration: F_i = 1/B Σ_{b<B} (∂ mean_{n∈X_b} log p(ŷ_n|x_n) / ∂θ_i)², the
  square of the gradient of the *batch-mean* log-likelihood, for each of the first B =
  ``sq_grad_batches`` mini-batches X_b of ``sq_grad_batch_size`` training samples in data order
  (unshuffled), averaged over the B batches (the seed's loop: per batch, backward the batch-mean
  log-likelihood and accumulate grad² / B). It is not a Fisher: with true labels its expectation
  is F_emp / |X_b| + (1 − 1/|X_b|) · ḡ², ḡ the mean gradient of the task loss, which is small
  once the task is learned; so it is about |X_b| times smaller than the per-sample Fisher (λ means
  something else) and, from 2 batches, noisy. ``fisher_labels`` true | pred | sample (not all);
  ``fisher_samples`` must stay null (the batches fix the samples). Eval mode as well.
- ``fisher_estimator=batch_label_cross_mean_sq_grad`` is what the seeds' EWC trade-off notebook
  computes (PROTOCOLS.md D2, its ``_update_fisher_params``), kept only to reproduce that picture. For
  each of the same first B batches of 100 it takes ``log_softmax(model(x))[:, target]``: indexed with
  the batch's whole label *vector*, this is a 100 × 100 matrix, every sample's log-probability of
  every label present in the batch (not one entry per sample). It stacks the B matrices, takes the
  mean of all their entries (one scalar L for all batches at once), differentiates L and squares the
  gradient: F_i = (∂L/∂θ_i)², L = 1/Σ_b |X_b|² Σ_b Σ_{n,m∈X_b} log p(ŷ_m|x_n). ``squared_batch_grad``
  instead gathers one label per sample and averages the squares of per-batch gradients. Per sample, L
  is the log-likelihood of the batch's label histogram (≈ the mean of log p(c|x) over the classes),
  whose gradient stays large at a trained model where a true-label gradient is near zero: F is much
  larger, so λ means something else again. The notebook's penalty is (λ/2)·Σ F (θ − θ*)², i.e.
  ``half=true``. Same options and restrictions as ``squared_batch_grad`` (its ŷ: ``true``).
- Defaults (configs/method/ewc.yaml, which explains them): half=true (Kirkpatrick's and van de
  Ven's λ/2; Hsu et al. use half=false), fisher_estimator=per_sample, fisher_labels=all (the exact
  Fisher, Kirkpatrick's definition; the presets set their papers' ``pred``), all training samples.
  The constructor has no defaults of its own (the YAML is the one place). ``fisher_batch`` bounds
  the per-sample gradients held in memory at once by the ``torch.func`` path (for ``all``:
  fisher_batch // K samples × K classes); Linear-only models take an exact closed form that holds
  none (see cl_runner/curvature/estimators.py).
- ``fisher``: the representation of F_k (``cl_runner/curvature/``): ``diag`` (the code
  path above, the default), ``kfac`` (per Linear/Conv2d layer G ⊗ A, the rest diagonal) or
  ``dense`` (P × P, refused above 20,000 parameters). With kfac/dense the penalty is
  λ · s · Σ_{k<t} (θ − θ*_k)ᵀ F_k (θ − θ*_k), one term per past task (a matvec each per step), and
  only ``fisher_estimator=per_sample``; ``fisher_batch`` is then the chunk of samples per pass.
- ``importance()``: the latest task's Fisher (its diagonal for kfac/dense);
  ``curvature_images()``: the latest kfac/dense Fisher as a picture (TensorBoard ``fisher/<kind>``).
"""

from __future__ import annotations

from torch import Tensor, nn

from cl_runner import curvature
from cl_runner.curvature import BATCH_ESTIMATORS, FISHER_ESTIMATORS, FISHER_LABELS, fisher_diagonal
from cl_runner.data.stream import Task
from cl_runner.methods.base import eval_mode, named_params
from cl_runner.methods.checks import check_choice, check_count
from cl_runner.methods.regularizer import QuadraticPenalty, snapshot
from cl_runner.seeding import choose_subset, task_generator


class EWC(QuadraticPenalty):
    name = "ewc"
    stackable = True  # the vectorized launcher may train it stacked (cl_runner/stacked.py)

    def __init__(
        self,
        strength: float,
        half: bool,
        fisher_labels: str,
        fisher_samples: int | None,
        fisher_batch: int,
        fisher_estimator: str,
        sq_grad_batch_size: int,
        sq_grad_batches: int,
        fisher: str,
    ):
        super().__init__(strength, half=half)
        self.fisher_kind = check_choice("fisher", fisher, curvature.KINDS)
        self.fisher_labels = check_choice("fisher_labels", fisher_labels, FISHER_LABELS)
        self.fisher_samples = check_count("fisher_samples", fisher_samples, allow_none=True)
        self.fisher_batch = check_count("fisher_batch", fisher_batch)
        self.fisher_estimator = check_choice("fisher_estimator", fisher_estimator, FISHER_ESTIMATORS)
        self.sq_grad_batch_size = check_count("sq_grad_batch_size", sq_grad_batch_size)
        self.sq_grad_batches = check_count("sq_grad_batches", sq_grad_batches)
        if self.fisher_estimator != "per_sample":
            self._check_batch_estimator()
        self._terms: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []
        self._latest: dict[str, Tensor] = {}
        self._curv_terms: list[curvature.Term] = []  # fisher=kfac/dense: (θ*_k, F_k, weight)

    def _check_batch_estimator(self) -> None:
        """The batch estimators (BATCH_ESTIMATORS): diagonal, a label vector (not `all`), the first batches."""
        est = self.fisher_estimator
        if self.fisher_kind != "diag":
            raise ValueError(
                f"method.fisher={self.fisher_kind} needs fisher_estimator=per_sample ({est} is diagonal only)"
            )
        if self.fisher_labels == "all":
            raise ValueError(
                f"method.fisher_labels=all does not apply to fisher_estimator={est}; choose one of: true, pred, sample"
            )
        if self.fisher_samples is not None:
            raise ValueError(
                f"method.fisher_samples applies to fisher_estimator=per_sample only; with {est} set "
                "sq_grad_batches and sq_grad_batch_size (fisher_samples=null)"
            )

    def setup(self, model: nn.Module, stream, seed: int = 0) -> None:
        super().setup(model, stream, seed)
        self.check_model(model)

    def check_model(self, model: nn.Module) -> None:
        if self.fisher_kind == "dense":
            curvature.check_dense(sum(p.numel() for p in named_params(model).values()))

    def fisher(self, model: nn.Module, task: Task) -> dict[str, Tensor]:
        """Diagonal Fisher of ``task`` at the model's current parameters (eval mode, state kept)."""
        g = task_generator(self.seed, task.id)
        x, y = task.x_train, task.y_train
        if self.fisher_estimator != "per_sample":
            estimate = BATCH_ESTIMATORS[self.fisher_estimator]
            with eval_mode(model):
                return estimate(
                    model, x, y, task.units, self.fisher_labels, self.sq_grad_batch_size, self.sq_grad_batches, g
                )
        idx = choose_subset(len(x), self.fisher_samples, g)
        if idx is not None:
            idx = idx.to(x.device)
            x, y = x[idx], y[idx]
        with eval_mode(model):
            return fisher_diagonal(model, x, y, task.units, self.fisher_labels, self.fisher_batch, g)

    def structured_fisher(self, model: nn.Module, task: Task) -> curvature.Curvature:
        """``fisher`` = kfac | dense of ``task`` (same samples and labels as the diagonal)."""
        g = task_generator(self.seed, task.id)
        x, y = task.x_train, task.y_train
        idx = choose_subset(len(x), self.fisher_samples, g)
        if idx is not None:
            idx = idx.to(x.device)
            x, y = x[idx], y[idx]
        kind, labels, chunk = self.fisher_kind, self.fisher_labels, self.fisher_batch
        return curvature.fisher(model, x, task.units, kind=kind, labels=labels, y=y, generator=g, chunk=chunk)

    def after_task(self, model: nn.Module, task: Task) -> None:
        if self.fisher_kind != "diag":
            f = self.structured_fisher(model, task)
            self._latest = f.diagonal()
            self._curv_terms.append((snapshot(model), f, 1.0))
            return
        self._latest = self.fisher(model, task)
        self._terms.append((snapshot(model), self._latest))
        self.set_terms(self._terms)

    def penalty(self, model: nn.Module) -> Tensor | None:
        if self.fisher_kind == "diag":
            return super().penalty(model)
        total = curvature.penalty(self._curv_terms, model)
        return None if total is None else (0.5 if self.half else 1.0) * total

    def add_penalty_grad(self, model: nn.Module) -> Tensor | None:
        if self.fisher_kind == "diag":
            return super().add_penalty_grad(model)
        return curvature.add_penalty_grad(self._curv_terms, model, self.strength * (0.5 if self.half else 1.0))

    def curvature_images(self) -> dict[str, Tensor]:
        """The latest Fisher as a picture; a KFAC one too large for a matrix as its layers' factors."""
        if not self._curv_terms:
            return {}
        f = self._curv_terms[-1][1]
        if f.kind == "kfac" and f.n_params > curvature.DENSE_LIMIT:
            return {f"fisher/kfac/{k}": v for k, v in f.factor_images().items()}
        return {f"fisher/{self.fisher_kind}": f.image()}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["_curv_terms"] = curvature.terms_state(self._curv_terms)
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict({**state, "_curv_terms": curvature.terms_from_state(state["_curv_terms"])})

    def importance(self) -> dict[str, Tensor]:
        return dict(self._latest)
