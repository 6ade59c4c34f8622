"""EWC's batch estimators against brute force: ``fisher_estimator=squared_batch_grad`` against an
autograd loop, ``batch_label_cross_mean_sq_grad`` (the EWC trade-off notebook's,
docs/protocols/ewctradeoff.md#fisher) against a literal re-implementation of the notebook's code; their
data order and options, and the state contract of importance passes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import defaults
from test_methods import UNITS, assert_dicts_close, make_model, make_task
from torch import autograd, nn
from torch.nn import functional as F

from cl_runner.curvature import estimators as ps
from cl_runner.methods import build_method, eval_mode
from cl_runner.methods.ewc import EWC
from cl_runner.methods.online_ewc import OnlineEWC


def squared_batch_grad(model, *args):
    with eval_mode(model):  # the caller's job (as for every function of per_sample.py)
        return ps.squared_batch_grad(model, *args)


def fisher_diagonal(model, *args):
    with eval_mode(model):
        return ps.fisher_diagonal(model, *args)


def brute_squared_batch_grad(model, x, y, units, batch_size, n_batches):
    """The estimator's loop: per mini-batch (data order), backward the batch-mean log-likelihood of the
    true labels and accumulate grad² / (number of batches)."""
    lo, hi = units
    model = copy.deepcopy(model)
    model.eval()
    batches = [(x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(x), batch_size)][:n_batches]
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for xb, yb in batches:
        model.zero_grad()
        logp = torch.log_softmax(model(xb)[:, lo:hi], 1)
        logp[torch.arange(len(yb)), yb - lo].mean().backward()
        for n, p in model.named_parameters():
            out[n] += p.grad**2 / len(batches)
    return out


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("batch_size, n_batches", [(7, 2), (5, 3), (7, 9)])  # (7, 9): only 4 batches exist
def test_squared_batch_grad_equals_brute_force(batch_norm, batch_size, n_batches):
    model, task = make_model(batch_norm=batch_norm), make_task(n=23)
    got = squared_batch_grad(model, task.x_train, task.y_train, UNITS, "true", batch_size, n_batches)
    want = brute_squared_batch_grad(model, task.x_train, task.y_train, UNITS, batch_size, n_batches)
    assert set(got) == set(want)
    assert_dicts_close(got, want)
    assert all(v.abs().sum() > 0 for v in got.values())


def test_squared_batch_grad_uses_only_the_first_batches_in_data_order():
    model, task = make_model(), make_task(n=23)
    x, y = task.x_train.clone(), task.y_train.clone()
    first = squared_batch_grad(model, x, y, UNITS, "true", 5, 2)
    x[10:] = torch.randn_like(x[10:])  # samples after the first 2 × 5 do not matter
    assert_dicts_close(squared_batch_grad(model, x, y, UNITS, "true", 5, 2), first)
    x[9] = x[9] + 1.0  # the last sample of the second batch does
    changed = squared_batch_grad(model, x, y, UNITS, "true", 5, 2)
    assert any(not torch.allclose(changed[n], first[n]) for n in first)
    # a shuffled order gives another estimate: the batches are taken unshuffled
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    shuffled = squared_batch_grad(model, task.x_train[perm], task.y_train[perm], UNITS, "true", 5, 2)
    assert any(not torch.allclose(shuffled[n], first[n]) for n in first)


def test_batch_of_one_is_the_per_sample_empirical_fisher_and_larger_batches_shrink_it():
    model, task = make_model(), make_task(n=24)
    x, y = task.x_train, task.y_train
    per_sample = fisher_diagonal(model, x, y, UNITS, "true")
    assert_dicts_close(squared_batch_grad(model, x, y, UNITS, "true", 1, 24), per_sample)
    # squaring a mean of 12 gradients: the per-sample variance is averaged away
    batched = squared_batch_grad(model, x, y, UNITS, "true", 12, 2)
    total = lambda f: sum(v.sum() for v in f.values())  # noqa: E731
    assert total(batched) < 0.5 * total(per_sample)


def test_ewc_option_selects_the_estimator_and_pred_labels_follow_the_model():
    model, task = make_model(), make_task(n=23)
    ewc = EWC(
        1.0,
        **defaults(
            "ewc", fisher_estimator="squared_batch_grad", fisher_labels="true", sq_grad_batch_size=6, sq_grad_batches=2
        ),
    )
    assert_dicts_close(
        ewc.fisher(model, task),
        brute_squared_batch_grad(model, task.x_train, task.y_train, UNITS, 6, 2),
    )
    with torch.no_grad():
        model.eval()
        pred = model(task.x_train)[:, UNITS[0] : UNITS[1]].argmax(1) + UNITS[0]
        model.train()
    ewc_pred = EWC(
        1.0, **defaults("ewc", fisher_estimator="squared_batch_grad", fisher_labels="pred", sq_grad_batch_size=6)
    )
    assert_dicts_close(
        ewc_pred.fisher(model, task),
        brute_squared_batch_grad(model, task.x_train, pred, UNITS, 6, 2),
    )
    # online EWC takes the same options
    online = OnlineEWC(
        1.0, **defaults("online_ewc", fisher_estimator="squared_batch_grad", fisher_labels="true", sq_grad_batch_size=6)
    )
    online.after_task(model, task)
    assert_dicts_close(
        online.importance(),
        brute_squared_batch_grad(model, task.x_train, task.y_train, UNITS, 6, 2),
    )


def test_importance_pass_leaves_the_model_as_it_found_it():
    model, task = make_model(dropout=0.5), make_task(n=30)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(task.x_train)[:, 2:5], task.y_train - 2).backward()
        opt.step()
    state = copy.deepcopy(model.state_dict())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    ewc = EWC(1.0, **defaults("ewc", fisher_estimator="squared_batch_grad", fisher_labels="true", sq_grad_batch_size=8))
    ewc.after_task(model, task)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():  # parameters and BatchNorm statistics
        assert torch.equal(v, state[k]), k
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    # eval mode (dropout off, running statistics): the brute force in eval mode agrees
    assert_dicts_close(
        ewc.importance(),
        brute_squared_batch_grad(model, task.x_train, task.y_train, UNITS, 8, 2),
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"fisher_estimator": "batch"},
            "method.fisher_estimator='batch' is not valid; choose one of: per_sample, squared_batch_grad, "
            "batch_label_cross_mean_sq_grad",
        ),
        (
            {"fisher_estimator": "squared_batch_grad", "fisher_labels": "all"},
            "method.fisher_labels=all does not apply to fisher_estimator=squared_batch_grad; "
            "choose one of: true, pred, sample",
        ),
        (
            {
                "fisher_estimator": "squared_batch_grad",
                "fisher_labels": "true",
                "fisher_samples": 100,
            },
            "method.fisher_samples applies to fisher_estimator=per_sample only; with squared_batch_grad set "
            "sq_grad_batches and sq_grad_batch_size (fisher_samples=null)",
        ),
        (
            {"fisher_estimator": "batch_label_cross_mean_sq_grad", "fisher_labels": "all"},
            "method.fisher_labels=all does not apply to fisher_estimator=batch_label_cross_mean_sq_grad; "
            "choose one of: true, pred, sample",
        ),
        (
            {"fisher_estimator": "batch_label_cross_mean_sq_grad", "fisher_labels": "true", "fisher": "kfac"},
            "method.fisher=kfac needs fisher_estimator=per_sample (batch_label_cross_mean_sq_grad is diagonal only)",
        ),
        ({"sq_grad_batches": 0}, "method.sq_grad_batches=0 must be a positive integer"),
        (
            {"sq_grad_batch_size": 2.5},
            "method.sq_grad_batch_size=2.5 must be a positive integer",
        ),
    ],
)
def test_bad_estimator_options_give_one_clear_line(options, message):
    with pytest.raises(ValueError) as err:
        build_method("ewc", 1.0, options)
    assert str(err.value) == message


# ---- the D2 notebook's estimator -----------------------------------------------------------------


def notebook_update_fisher_params(model, batches):
    """The notebook's ``_update_fisher_params`` as it writes it, over the given (input, target) batches:
    each batch's log-softmax indexed with the batch's label vector, stacked, one mean, one gradient,
    squared."""
    log_liklihoods = []
    for input, target in batches:
        output = F.log_softmax(model(input), dim=1)
        log_liklihoods.append(output[:, target])
    log_likelihood = torch.cat(log_liklihoods).mean()
    grad_log_liklihood = autograd.grad(log_likelihood, model.parameters())
    names = [name for name, _ in model.named_parameters()]
    return {name: g.data.clone() ** 2 for name, g in zip(names, grad_log_liklihood, strict=True)}


ALL_UNITS = (0, 6)  # the notebook's log-softmax runs over every output (one shared head)


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("batch_size, n_batches", [(7, 2), (5, 3)])
def test_batch_label_cross_mean_equals_the_notebooks_code(batch_norm, batch_size, n_batches):
    model, task = make_model(batch_norm=batch_norm), make_task(n=23, units=ALL_UNITS)
    x, y = task.x_train, task.y_train
    opts = {"fisher_labels": "true", "sq_grad_batch_size": batch_size, "sq_grad_batches": n_batches}
    ewc = EWC(1.0, **defaults("ewc", fisher_estimator="batch_label_cross_mean_sq_grad", **opts))
    got = ewc.fisher(model, task)
    ref = copy.deepcopy(model).eval()
    batches = [(x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, batch_size * n_batches, batch_size)]
    want = notebook_update_fisher_params(ref, batches)
    assert set(got) == set(want)
    assert_dicts_close(got, want)
    assert all(v.abs().sum() > 0 for v in got.values())
    # a batch's matrix holds every sample × every label of the batch: not the one-label-per-sample estimate
    one_label = squared_batch_grad(model, x, y, ALL_UNITS, "true", batch_size, n_batches)
    assert any(not torch.allclose(got[n], one_label[n]) for n in got)


def test_batch_label_cross_mean_with_a_short_last_batch_and_a_sub_range_of_units():
    """Where the notebook's stacking cannot go (a last batch shorter than the others) the scalar is the
    mean over all (sample, batch label) pairs; outputs restricted to the task's units."""
    model, task = make_model(), make_task(n=23)  # UNITS = (2, 5); batches of 7, 7, 7, 2
    x, y = task.x_train, task.y_train
    with eval_mode(model):
        got = ps.batch_label_cross_mean_sq_grad(model, x, y, UNITS, "true", 7, 9)
    ref = copy.deepcopy(model).eval()
    params = list(ref.parameters())
    total, pairs = 0.0, 0
    for s in range(0, 23, 7):
        logp = torch.log_softmax(ref(x[s : s + 7])[:, UNITS[0] : UNITS[1]], 1)
        for n in range(len(logp)):  # every sample × every label of its batch, one by one
            for m in range(len(logp)):
                total, pairs = total + logp[n, y[s + m] - UNITS[0]], pairs + 1
    want = [g**2 for g in torch.autograd.grad(total / pairs, params)]
    assert pairs == 3 * 49 + 4
    assert_dicts_close(got, dict(zip((n for n, _ in ref.named_parameters()), want, strict=True)))
