"""The example extension's own tests, as a user's package keeps them (run them with the package
installed next to cl-runner: `pip install -e . && pytest`): the method's importance and penalty
against a brute-force computation, the model's shape, and cl-runner's method contract on the
method (cl_runner.contract: what `cl-run-check method=sqgrad model=resmlp` runs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cl_example.resmlp import ResidualMLP
from cl_example.sqgrad import SquaredGradient
from hydra import compose, initialize_config_module

from cl_runner import contract
from cl_runner.data.stream import Task


def _task(i: int, n: int = 10) -> Task:
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 2, (n,), generator=g)
    return Task(i, f"t{i}", x, y, x[:2], y[:2], classes=[0, 1], units=(0, 2))


def _brute_force_squares(model, task, seed, samples, batch):
    """Mean over mini-batches of the squared gradient of each batch's cross-entropy, written out."""
    chosen = torch.randperm(len(task.x_train), generator=torch.Generator().manual_seed(seed * 1_000_003 + task.id))
    chosen = chosen[:samples].tolist()
    batches = [chosen[i : i + batch] for i in range(0, len(chosen), batch)]
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b in batches:
        model.zero_grad()
        model.eval()
        F.cross_entropy(model(task.x_train[b])[:, 0:2], task.y_train[b]).backward()
        model.train()
        for n, p in model.named_parameters():
            total[n] += p.grad.double().square().float()
    model.zero_grad()
    return {n: t / len(batches) for n, t in total.items()}


def test_importance_and_penalty_against_brute_force():
    torch.manual_seed(0)
    model = ResidualMLP((1, 4, 4), 2, width=5, depth=2)
    method = SquaredGradient(strength=3.0, samples=7, batch=3, decay=0.5)
    method.setup(model, stream=None, seed=4)
    first, second = _task(0), _task(1)
    method.after_task(model, first)
    expected = _brute_force_squares(model, first, 4, 7, 3)
    for n in expected:
        torch.testing.assert_close(method.omega[n], expected[n], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    method.after_task(model, second)  # Ω ← 0.5 Ω + the second task's squares; θ* = the moved parameters
    new = _brute_force_squares(model, second, 4, 7, 3)
    for n in new:
        torch.testing.assert_close(method.omega[n], 0.5 * expected[n] + new[n], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    value = method.penalty(model).detach()
    by_hand = sum(float((method.omega[n] * 0.05**2).sum()) for n, _ in model.named_parameters())
    assert float(value) == pytest.approx(by_hand, rel=1e-4)


def test_resmlp_takes_any_input_shape_and_ends_in_head():
    model = ResidualMLP((3, 5, 7), 4, width=8, depth=3)
    assert model(torch.zeros(2, 3, 5, 7)).shape == (2, 4)
    assert isinstance(model.head, torch.nn.Linear) and len(model.blocks) == 3


def test_bad_options_are_one_line():
    with pytest.raises(ValueError, match="^method.batch must be"):
        SquaredGradient(strength=1.0, samples=8, batch=0, decay=1.0)
    with pytest.raises(ValueError, match="^model.depth must be"):
        ResidualMLP((1, 8, 8), 10, width=8, depth=-1)


def _compose(overrides):
    """cl-run's config with these overrides (the example's configs come from its entry point)."""
    with initialize_config_module("cl_runner.configs", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_the_method_keeps_cl_runners_contract(tmp_path):
    outcomes = contract.check_method(_compose, [*contract.TINY, "method=sqgrad", "model=resmlp"], tmp_path)
    assert [o.status for o in outcomes] == ["ok"] * len(contract.ORDER), [o.line() for o in outcomes]
