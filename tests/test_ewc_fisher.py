"""EWC and online EWC with a structured Fisher (``method.fisher: kfac | dense``): the penalty's value
and gradient against autograd on the brute-force quadratic with each task's dense matrix, the
online decay, checkpoint state, and the Fisher picture read back from the TensorBoard event file."""

import io

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from cl_runner import curvature
from cl_runner.data.benchmarks import build_stream
from cl_runner.data.stream import Task
from cl_runner.methods import build_method
from cl_runner.methods.base import named_params
from cl_runner.models import build_model
from cl_runner.report.tb import TensorBoardLogger
from cl_runner.seeding import task_generator
from cl_runner.trainer import Trainer, make_optimizer_factory


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()


def _task(i, n=20):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return Task(i, f"t{i}", x, y, x[:2], y[:2], [0, 1, 2, 3], (0, 4), (0, 4))


def _move(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _flat(model):
    return torch.cat([p.reshape(-1) for p in named_params(model).values()])


def _dense_fisher(model, task, labels):
    """The task's Fisher as a matrix, recomputed at the current parameters (dense kind, the same draws)."""
    g = task_generator(0, task.id)
    return curvature.fisher(model, task.x_train, task.units, kind="dense", labels=labels, y=task.y_train, generator=g)


@pytest.mark.parametrize("kind", ["kfac", "dense"])
@pytest.mark.parametrize("labels", ["all", "sample"])
def test_ewc_penalty_value_and_gradient_against_autograd(kind, labels):
    model = _model()
    m = build_method("ewc", 7.0, {"fisher": kind, "fisher_labels": labels, "half": True})
    m.setup(model, None, seed=0)
    want_terms = []
    for i in range(2):
        task = _task(i)
        _move(model, 10 + i)
        m.after_task(model, task)
        f = _dense_fisher(model, task, labels).to_dense() if kind == "dense" else m._curv_terms[-1][1].to_dense()
        want_terms.append((_flat(model).detach().clone(), f))
    _move(model, 99)
    theta = _flat(model).detach().clone().requires_grad_(True)
    want = 7.0 * 0.5 * sum((theta - a) @ f @ (theta - a) for a, f in want_terms)
    (want_grad,) = torch.autograd.grad(want, theta)
    assert want > 0
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # the penalty's gradient is added to what is there
    value = m.add_penalty_grad(model)
    torch.testing.assert_close(value, want.detach())
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in named_params(model).values()]), want_grad + 1)
    torch.testing.assert_close(7.0 * m.penalty(model), want.detach())  # the autograd form agrees


def test_kfac_of_one_sample_one_layer_is_the_dense_penalty():
    model = nn.Linear(6, 4).double()
    task = _task(0, n=1)
    ms = {k: build_method("ewc", 1.0, {"fisher": k, "half": False}) for k in ("kfac", "dense")}
    for m in ms.values():
        m.setup(model, None, seed=0)
        m.after_task(model, task)
    _move(model, 3)
    torch.testing.assert_close(ms["kfac"].penalty(model), ms["dense"].penalty(model))


@pytest.mark.parametrize("gamma_in_penalty", [False, True])
@pytest.mark.parametrize("kind", ["kfac", "dense"])
def test_online_ewc_decays_the_running_fisher(kind, gamma_in_penalty):
    model = _model()
    gamma = 0.5
    m = build_method("online_ewc", 1.0, {"fisher": kind, "gamma": gamma, "gamma_in_penalty": gamma_in_penalty})
    m.setup(model, None, seed=0)
    fishers = []
    for i in range(3):
        _move(model, 20 + i)
        m.after_task(model, _task(i))
        fishers.append(m.structured_fisher(model, _task(i)).to_dense())  # the same pass again
    running = gamma**2 * fishers[0] + gamma * fishers[1] + fishers[2]
    anchor = _flat(model).detach().clone()
    _move(model, 50)
    d = _flat(model).detach() - anchor
    scale = 0.5 * (gamma if gamma_in_penalty else 1.0)  # half=true by default
    torch.testing.assert_close(m.penalty(model), scale * d @ running @ d)
    torch.testing.assert_close(m._curv_terms[0][1].to_dense(), running)
    assert len(m._curv_terms) == 1


def test_checkpoint_state_roundtrip(tmp_path):
    model = _model()
    for name in ("ewc", "online_ewc"):
        m = build_method(name, 2.0, {"fisher": "kfac"})
        m.setup(model, None, seed=0)
        for i in range(2):
            _move(model, 30 + i)
            m.after_task(model, _task(i))
        torch.save(m.state_dict(), tmp_path / "s.pt")
        state = torch.load(tmp_path / "s.pt", weights_only=True)  # plain tensors, lists, dicts
        fresh = build_method(name, 2.0, {"fisher": "kfac"})
        fresh.setup(model, None, seed=0)
        fresh.load_state_dict(state)
        _move(model, 40)
        torch.testing.assert_close(fresh.penalty(model), m.penalty(model))
        assert fresh.penalty(model) > 0


def test_bad_fisher_option_is_one_line():
    with pytest.raises(ValueError, match=r"^method.fisher='full' is not valid; choose one of: diag, kfac, dense$"):
        build_method("ewc", 1.0, {"fisher": "full"})
    with pytest.raises(ValueError, match="fisher_estimator=per_sample"):
        build_method("ewc", 1.0, {"fisher": "kfac", "fisher_estimator": "squared_batch_grad", "fisher_labels": "true"})


@pytest.mark.parametrize("kind", ["dense", "kfac"])
def test_fisher_picture_is_in_tensorboard(tmp_path, kind):
    cfg = compose_config(
        "benchmark=split_digits",
        "benchmark.n_tasks=2",
        "benchmark.pad=28",
        "benchmark.max_train_per_task=40",
        "benchmark.max_test_per_task=10",
        "model=cnn_d3",
        "method=ewc",
        f"method.fisher={kind}",
        "scenario=class",
        "batch_size=20",
        "threads=1",
    )
    stream = build_stream(cfg.benchmark, cfg.scenario, 0, "cpu", ".")
    model = build_model(cfg.model, stream.input_shape, stream.n_outputs)
    method = build_method("ewc", 10.0, {"fisher": kind})
    logger = TensorBoardLogger(tmp_path, len(stream))
    trainer = Trainer(model, method, stream, make_optimizer_factory(cfg.optimizer), batch_size=20, events=logger)
    trainer.run()
    logger.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    images = events.Images(f"fisher/{kind}")
    # one picture per task at its end, but the last task's (its Fisher is not computed: no penalty reads it)
    assert [e.step for e in images] == logger.task_end_steps[:-1]
    last = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("L"), dtype=float)
    want = method.curvature_images()[f"fisher/{kind}"].numpy() * 255
    p = sum(q.numel() for q in model.parameters())
    assert last.shape == want.shape == (-(-p // 3),) * 2  # 2,580 parameters, max-pooled by 3 to ≤ 1024
    assert np.abs(last - want).max() <= 1  # uint8 rounding
    assert last.max() == 255 and last.min() == 0


def test_cl_run_refuses_a_too_large_dense_fisher_before_any_folder():
    from cl_runner.checks import validate

    cfg = compose_config("method=ewc", "method.fisher=dense")  # the default MLP 400-400: 190,410 parameters
    with pytest.raises(ValueError, match=r"^method.fisher=dense: the model has 190,410 trainable parameters"):
        validate(cfg)
    validate(compose_config("method=ewc", "method.fisher=kfac"))  # kfac has no limit
