"""Natural-gradient replay (cl_runner/methods/ng_replay.py): the preconditioned gradient against
(F + δI)⁻¹ g with F a brute-force sum of per-sample outer products and a dense torch.linalg.solve
(dense exactly; diag against the brute-force diagonal; KFAC where it is exact: one linear layer,
one sample), per-sample units in task-IL, recompute_every, the dense refusal, and resume."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import compose_config
from torch import nn

from cl_runner import curvature
from cl_runner.data.benchmarks import build_stream
from cl_runner.methods import build_method
from cl_runner.methods.base import Batch
from cl_runner.models import build_model
from cl_runner.trainer import Trainer, make_optimizer_factory, task_loss

DAMPING = 0.01


def _flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def brute_fisher(model, x, units_per_sample):
    """1/N Σ_n Σ_c p(c|x_n) g_nc g_ncᵀ, g_nc = ∇ log p(c|x_n) over the sample's own units."""
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    F = torch.zeros(P, P, dtype=torch.float64)
    for xn, (lo, hi) in zip(x, units_per_sample, strict=True):
        logp = torch.log_softmax(model(xn[None])[0, lo:hi], 0)
        for c in range(hi - lo):
            g = torch.autograd.grad(logp[c], params, retain_graph=True)
            g = torch.cat([t.reshape(-1) for t in g]).double()
            F += logp[c].exp().item() * torch.outer(g, g)
    return F / len(x)


def _ng(fisher, labels="all", **extra):
    ng = build_method("ng_replay", None, {"fisher": fisher, "fisher_labels": labels, "damping": DAMPING, **extra})
    ng._curvature, ng._age = None, 0
    return ng


def _step(model, ng, batch):
    """The trainer's step up to after_backward; returns (g before, g after)."""
    model.zero_grad()
    task_loss(model(batch.x), batch.y, batch.units, batch.sample_units).backward()
    g = _flat_grads(model).double().clone()
    ng.after_backward(model, batch)
    return g, _flat_grads(model).double()


@pytest.mark.parametrize("task_il", [False, True])
def test_dense_and_diag_preconditioning_against_a_dense_solve(task_il):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6))
    x = torch.randn(7, 4)
    if task_il:  # two heads of 3 units; each sample its own
        su = torch.tensor([[0, 3], [3, 6]])[torch.tensor([0, 1, 1, 0, 1, 0, 0])]
        y = su[:, 0] + torch.randint(0, 3, (7,))
        batch = Batch(x, y, (0, 3), su, task=1)
        units = su.tolist()
    else:  # class-IL: all 6 seen units
        y = torch.randint(0, 6, (7,))
        batch = Batch(x, y, (0, 6), None, task=1)
        units = [(0, 6)] * 7
    F = brute_fisher(model, x, units)
    eye = torch.eye(len(F), dtype=torch.float64)
    g, got = _step(model, _ng("dense"), batch)
    want = torch.linalg.solve(F + DAMPING * eye, g)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, g, rtol=0.1)  # the preconditioning did something
    g, got = _step(model, _ng("diag"), batch)
    assert torch.allclose(got, g / (F.diagonal() + DAMPING), rtol=1e-3, atol=1e-5)


def test_kfac_equals_the_dense_solve_where_it_is_exact():
    """One linear layer, one sample: F = (a aᵀ) ⊗ G exactly, so the KFAC solve is the dense one."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4))
    x, y = torch.randn(1, 3), torch.tensor([2])
    batch = Batch(x, y, (0, 4), None, task=0)
    F = brute_fisher(model, x, [(0, 4)])
    g, got = _step(model, _ng("kfac"), batch)
    want = torch.linalg.solve(F + DAMPING * torch.eye(len(F), dtype=torch.float64), g)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-5), (got - want).abs().max()


def test_recompute_every_reuses_the_fisher(monkeypatch):
    calls = []
    real = curvature.fisher
    monkeypatch.setattr(curvature, "fisher", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    ng = _ng("diag", "sample", recompute_every=3)
    batch = Batch(torch.randn(5, 4), torch.randint(0, 3, (5,)), (0, 3), None, task=0)
    for _ in range(7):
        _step(model, ng, batch)
    assert len(calls) == 3  # steps 1, 4, 7


def test_dense_is_refused_in_one_line_for_a_large_model():
    cfg = compose_config("benchmark=split_digits", "model=mlp")
    stream = build_stream(cfg.benchmark, cfg.scenario, 0, "cpu", ".")
    model = build_model(cfg.model, stream.input_shape, stream.n_outputs)
    with pytest.raises(ValueError, match=r"method.fisher=dense: the model has [\d,]+ trainable parameters"):
        _ng("dense").setup(model, stream, seed=0)


@pytest.mark.parametrize("fisher", ["kfac", "dense"])
def test_resume_gives_the_same_matrix(fisher, one_thread):
    cfg = compose_config("benchmark=split_digits", "benchmark.n_tasks=3", "scenario=task", "model=mlp")
    stream = build_stream(cfg.benchmark, cfg.scenario, 0, "cpu", ".")

    def trainer(checkpoint=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, stream.n_outputs))
        ng = build_method("ng_replay", None, {"fisher": fisher, "buffer_size": 40})
        opt = make_optimizer_factory(compose_config("optimizer=sgd").optimizer)
        return Trainer(model, ng, stream, opt, batch_size=32, epochs=1, seed=0, checkpoint=checkpoint)

    saved = []

    def keep(state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        saved.append(buffer.getvalue())

    full = trainer(keep).run()
    state = torch.load(io.BytesIO(saved[0]), weights_only=False)
    assert trainer().run(resume=state).matrix == full.matrix
