"""LwF, A-GEM, GEM and iCaRL (cl_runner/methods/{lwf,agem,gem,icarl}.py) against brute-force or literal
re-implementations of what mammoth c66408f computes, on tiny tensors: A-GEM's projection, GEM's dual QP
(every active set enumerated), the per-task memory gradients, the memories against the same draws replayed
by hand, LwF's distillation and warm-up, iCaRL's loss, herding (mammoth's loop) and nearest-mean
classifier. Then on a real stream: every memory method beats finetune on split digits class-IL, a run
resumed from its checkpoint gives the same matrix bitwise, and the checkpoint loads with weights_only."""

from __future__ import annotations

import contextlib
import copy
import io
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

from cl_runner.data.benchmarks import build_stream
from cl_runner.methods import build_method
from cl_runner.methods import gem as gem_module
from cl_runner.methods.agem import agem_project
from cl_runner.methods.base import Batch, eval_mode, named_params
from cl_runner.methods.gem import EPISODIC_STREAM, LinearFactors, gem_project, nonneg_qp, task_gradients
from cl_runner.methods.icarl import herding
from cl_runner.methods.lwf import LWF_STREAM, soft_cross_entropy
from cl_runner.models import build_model
from cl_runner.run import run_experiment
from cl_runner.seeding import task_generator
from cl_runner.trainer import Trainer, make_optimizer_factory


def _stream(scenario: str = "class", n_tasks: int = 3, active_units: str = "seen", per_task: int | None = None):
    extra = [f"benchmark.max_train_per_task={per_task}"] if per_task else []
    cfg = compose_config("benchmark=split_digits", f"benchmark.n_tasks={n_tasks}", f"scenario={scenario}", *extra)
    return build_stream(cfg.benchmark, cfg.scenario, 0, "cpu", ".", active_units=active_units)


def _model(stream, hidden=(16,), batch_norm=False, seed=0):
    cfg = compose_config("model=mlp", f"model.hidden=[{','.join(map(str, hidden))}]", f"model.batch_norm={batch_norm}")
    torch.manual_seed(seed)
    return build_model(cfg.model, stream.input_shape, stream.n_outputs)


# ---------------------------------------------------------------------------------------- A-GEM
def test_agem_projection_formula():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, r = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
        dot = float(a @ r)
        want = a - dot / float(r @ r) * r if dot < 0 else a
        assert torch.allclose(agem_project(a, r), want, rtol=0, atol=1e-12)
    zero = torch.zeros(5, dtype=torch.float64)
    assert torch.equal(agem_project(torch.ones(5, dtype=torch.float64), zero), torch.ones(5, dtype=torch.float64))
    conflicting = agem_project(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(conflicting, torch.tensor([1.0, 0.0]))  # projected onto g_ref's orthogonal complement


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_agem_step_equals_a_literal_reimplementation(scenario):
    """Memory = buffer // n_tasks samples of each past task drawn with the method's generator; the
    reference batch drawn from it; .grad after after_backward = the projection formula."""
    stream = _stream(scenario, n_tasks=3)
    model = _model(stream)
    agem = build_method("agem", None, {"buffer_size": 30, "replay_batch": 8})
    agem.setup(model, stream, seed=5)
    for t in (0, 1):
        agem.before_task(model, stream[t])
        agem.after_task(model, stream[t])
    # the memory against the same draws replayed by hand
    gen = task_generator(5, EPISODIC_STREAM)
    idx = [torch.randperm(stream[t].n_train, generator=gen)[:10] for t in (0, 1)]
    assert torch.equal(agem.memory.x, torch.cat([stream[t].x_train[i] for t, i in zip((0, 1), idx, strict=True)]))
    assert torch.equal(agem.memory.y, torch.cat([stream[t].y_train[i] for t, i in zip((0, 1), idx, strict=True)]))
    assert agem.memory.task.tolist() == [0] * 10 + [1] * 10
    task = stream[2]
    agem.before_task(model, task)
    batch = Batch(task.x_train[:16], task.y_train[:16], task.units, None, 2)
    model.zero_grad()
    F.cross_entropy(model(batch.x)[:, task.units[0] : task.units[1]], batch.y - task.units[0]).backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    agem.after_backward(model, batch)
    got = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    # the reference gradient by hand: each drawn sample over its task's units now
    drawn = torch.randperm(20, generator=gen)[:8]
    ref = copy.deepcopy(model)
    ref.zero_grad()
    logits = ref(agem.memory.x[drawn])
    losses = []
    for i, j in enumerate(drawn.tolist()):
        lo, hi = stream.eval_units(2, int(agem.memory.task[j]))
        losses.append(F.cross_entropy(logits[i : i + 1, lo:hi], agem.memory.y[j : j + 1] - lo))
    torch.stack(losses).mean().backward()
    r = torch.cat([p.grad.flatten() for p in ref.parameters()]).double()
    dot = float(g @ r)
    want = g - dot / float(r @ r) * r if dot < 0 else g
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------- GEM
def brute_force_qp(q: np.ndarray, c: np.ndarray, lower: float) -> np.ndarray:
    """argmin ½ vᵀQv + cᵀv s.t. v ≥ lower: the best stationary point over every set of free variables."""
    k = len(c)
    best, best_value = None, np.inf
    for free in itertools.product([False, True], repeat=k):
        f = np.array(free)
        v = np.full(k, lower)
        if f.any():
            rhs = -c[f] - q[np.ix_(f, ~f)] @ v[~f]
            v[f] = np.linalg.solve(q[np.ix_(f, f)], rhs)
        if (v < lower - 1e-12).any():
            continue
        value = 0.5 * v @ q @ v + c @ v
        if value < best_value:
            best, best_value = v, value
    return best


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_gem_qp_solver_equals_brute_force(k):
    rng = np.random.default_rng(k)
    for trial in range(25):
        a = rng.normal(size=(k, 6)) + (0.9 * rng.normal(size=6) if trial % 2 else 0.0)  # correlated rows too
        q = a @ a.T + 1e-3 * np.eye(k)
        c = rng.normal(size=k) * (10.0 ** rng.integers(-3, 3))
        w = nonneg_qp(q, c)
        want = brute_force_qp(q, c, 0.0)
        assert np.allclose(w, want, rtol=1e-9, atol=1e-9 * np.abs(want).max() + 1e-14), (trial, w, want)
        grad = q @ w + c  # KKT: w ≥ 0, gradient ≥ 0, complementary
        assert (w >= 0).all() and (grad >= -1e-9 * np.abs(c).max()).all()
        assert np.abs(w * grad).max() <= 1e-9 * (np.abs(c).max() * (np.abs(w).max() + 1))


@pytest.mark.parametrize("margin", [0.0, 0.5, 1.0])
def test_gem_projection_equals_brute_force_dual(margin):
    """g̃ = Gᵀv + g with v the dual over v ≥ γ (GEM's and mammoth's project2cone2), in float64 by hand."""
    gen = torch.Generator().manual_seed(1)
    for k in (1, 3, 6):
        base = torch.randn(40, generator=gen)
        memories = 0.8 * base + torch.randn(k, 40, generator=gen)
        g = -memories.mean(0) + 0.3 * torch.randn(40, generator=gen)
        mem, gd = memories.double().numpy(), g.double().numpy()
        q = mem @ mem.T
        q = 0.5 * (q + q.T) + 1e-3 * np.eye(k)
        v = brute_force_qp(q, mem @ gd, margin)
        want = torch.from_numpy(v @ mem + gd).float()
        got = gem_project(g, memories, margin, 1e-3)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        if margin == 0.0:  # the projected gradient satisfies every constraint (up to ε's slack)
            assert (memories.double() @ got.double() >= -1e-2 * float(v.max()) - 1e-6).all()


def test_gem_projection_matches_quadprog_when_installed():
    quadprog = pytest.importorskip("quadprog")
    gen = torch.Generator().manual_seed(2)
    for k in (2, 9, 19):
        memories = 0.7 * torch.randn(300, generator=gen) + torch.randn(k, 300, generator=gen)
        g = -0.5 * memories.mean(0) + torch.randn(300, generator=gen)
        mem, gd = memories.double().numpy(), g.double().numpy()
        q = mem @ mem.T
        q = 0.5 * (q + q.T) + 1e-3 * np.eye(k)
        v = quadprog.solve_qp(q, -(mem @ gd), np.eye(k), np.zeros(k) + 0.5)[0]  # mammoth's call
        want = torch.from_numpy(v @ mem + gd).float()
        assert torch.allclose(gem_project(g, memories, 0.5, 1e-3), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_gem_task_gradients_equal_one_backward_per_task(batch_norm):
    stream = _stream("class", n_tasks=2)
    model = _model(stream, hidden=(12, 8), batch_norm=batch_norm)
    gen = torch.Generator().manual_seed(0)
    k, m = 3, 5
    x = torch.randn(k, m, *stream.input_shape, generator=gen)
    y = torch.randint(0, 4, (k, m), generator=gen)
    counts = torch.tensor([5, 3, 4])
    weight = (torch.arange(m)[None] < counts[:, None]).float() / counts[:, None]
    active = torch.arange(stream.n_outputs)[None] < torch.tensor([[4], [6], [4]])
    ref = copy.deepcopy(model)
    got = task_gradients(model, x, y, weight, active, named_params(model))
    rows = []
    for i in range(k):
        n = int(counts[i])
        logits = ref(x[i, :n]).masked_fill(~active[i], float("-inf"))
        grads = torch.autograd.grad(F.cross_entropy(logits, y[i, :n]), list(ref.parameters()))
        rows.append(torch.cat([gr.flatten() for gr in grads]))
    assert torch.allclose(got, torch.stack(rows), rtol=1e-4, atol=1e-6)
    if batch_norm:  # running statistics updated task by task, as mammoth's loop
        assert all(torch.equal(a, b) for a, b in zip(model.buffers(), ref.buffers(), strict=True))


@pytest.mark.parametrize("fast", [True, False])
def test_gem_step_projects_as_brute_force(fast, monkeypatch):
    """Both paths: the MLP's Linear-layer factors (``fast``) and the materialized per-task gradients."""
    monkeypatch.setattr(gem_module, "FAST_LINEAR", fast)
    stream = _stream("class", n_tasks=4)
    model = _model(stream, hidden=(16, 8))
    gem = build_method("gem", None, {"buffer_size": 40, "margin": 0.5})
    gem.setup(model, stream, seed=0)
    for t in range(3):
        gem.before_task(model, stream[t])
        gem.after_task(model, stream[t])
    assert gem.memory.counts == [10, 10, 10]
    task = stream[3]
    gem.before_task(model, task)
    projected = 0
    for s in range(0, 160, 16):
        batch = Batch(task.x_train[s : s + 16], task.y_train[s : s + 16], task.units, None, 3)
        model.zero_grad()
        lo, hi = task.units
        F.cross_entropy(model(batch.x)[:, lo:hi], batch.y - lo).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        rows = []
        for k in range(3):  # per-task memory gradient by hand
            ref = copy.deepcopy(model)
            sl = slice(10 * k, 10 * k + 10)
            lo_k, hi_k = stream.eval_units(3, k)
            loss = F.cross_entropy(ref(gem.memory.x[sl])[:, lo_k:hi_k], gem.memory.y[sl] - lo_k)
            rows.append(torch.cat([gr.flatten() for gr in torch.autograd.grad(loss, list(ref.parameters()))]))
        memories = torch.stack(rows)
        gem.after_backward(model, batch)
        got = torch.cat([p.grad.flatten() for p in model.parameters()])
        if (memories @ g < 0).any():
            projected += 1
            mem, gd = memories.double().numpy(), g.double().numpy()
            q = mem @ mem.T + 1e-3 * np.eye(3)
            want = torch.from_numpy(brute_force_qp(q, mem @ gd, 0.5) @ mem + gd).float()
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(got, g)
    assert projected > 0 and projected == gem.projected


def test_gem_linear_factors_equal_the_materialized_gradients():
    """G g, G Gᵀ (both Gram formulas) and Gᵀ v from the factors against the per-task gradient rows."""
    stream = _stream("class", n_tasks=2)
    model = _model(stream, hidden=(12, 8))
    gen = torch.Generator().manual_seed(0)
    k, m = 3, 4
    x = torch.randn(k, m, *stream.input_shape, generator=gen)
    y = torch.randint(0, 4, (k, m), generator=gen)
    counts = torch.tensor([4, 2, 3])
    weight = (torch.arange(m)[None] < counts[:, None]).float() / counts[:, None]
    active = torch.arange(stream.n_outputs)[None] < torch.tensor([[4], [6], [4]])
    params = named_params(model)
    rows = task_gradients(model, x, y, weight, active, params)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    factors = LinearFactors.build(model, x, y, weight, active, params)
    assert factors is not None
    assert torch.allclose(factors.dots(), rows @ g, rtol=1e-4, atol=1e-6)
    for kernel in (True, False):
        assert torch.allclose(factors.gram(kernel), rows @ rows.T, rtol=1e-4, atol=1e-6)
    v = torch.tensor([0.5, 1.5, 2.0])
    factors.add(v)
    assert torch.allclose(torch.cat([p.grad.flatten() for p in model.parameters()]), g + rows.T @ v, atol=1e-5)
    # a conv model takes the materialized path
    cnn = build_model(compose_config("model=cnn").model, (1, 32, 32), 4)
    xc = torch.randn(1, 2, 1, 32, 32)
    one = torch.ones(1, 2) / 2
    y0, on = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool)
    assert LinearFactors.build(cnn, xc, y0, one, on, named_params(cnn)) is None


# ---------------------------------------------------------------------------------------- LwF
def mammoth_smooth(logits, temp, dim):  # mammoth c66408f models/lwf.py, literally
    log = logits ** (1 / temp)
    return log / torch.sum(log, dim).unsqueeze(1)


def mammoth_modified_kl_div(old, new):
    return -torch.mean(torch.sum(old * torch.log(new), 1))


def test_lwf_distillation_is_mammoths():
    gen = torch.Generator().manual_seed(0)
    old, new = torch.randn(7, 4, generator=gen), torch.randn(7, 4, generator=gen)
    want = mammoth_modified_kl_div(mammoth_smooth(F.softmax(old, 1), 2, 1), mammoth_smooth(F.softmax(new, 1), 2, 1))
    assert torch.allclose(soft_cross_entropy(old, new, 2.0), want, rtol=1e-5)


@pytest.mark.parametrize("scenario", ["class", "task", "domain"])
def test_lwf_loss_distils_the_old_units(scenario):
    stream = _stream(scenario, n_tasks=4, active_units="all" if scenario == "class" else "seen")
    model = _model(stream)
    lwf = build_method("lwf", 2.0, {"temperature": 3.0, "ce_units": "seen"})
    lwf.setup(model, stream, seed=0)
    lwf.before_task(model, stream[0])
    assert (
        lwf.loss(Batch(stream[0].x_train[:4], stream[0].y_train[:4], stream[0].units), model(stream[0].x_train[:4]))
        is None
    )
    old = copy.deepcopy(model)  # the model at the task's start is the teacher
    task = stream[2]
    lwf.before_task(model, task)
    with torch.no_grad():  # training moves the model away from it
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = Batch(task.x_train[:9], task.y_train[:9], task.units, None, 2)
    logits = model(batch.x)
    z_old = old.eval()(batch.x)
    if scenario == "class":  # one softmax over tasks 0 and 1's classes
        heads = [(0, stream[2].own_units[0])]
    elif scenario == "task":  # one softmax per previous head, summed
        heads = [stream[0].own_units, stream[1].own_units]
    else:  # the shared head
        heads = [task.units]
    want = 2.0 * sum(
        mammoth_modified_kl_div(
            mammoth_smooth(F.softmax(z_old[:, lo:hi], 1), 3.0, 1),
            mammoth_smooth(F.softmax(logits[:, lo:hi], 1), 3.0, 1),
        )
        for lo, hi in heads
    )
    assert torch.allclose(lwf.loss(batch, logits), want, rtol=1e-5)
    # the task's cross-entropy: in class-IL with active_units=all, over the seen classes only (mammoth)
    ce = lwf.task_loss(batch, logits)
    lo, hi = (0, task.own_units[1]) if scenario == "class" else task.units
    assert torch.allclose(ce, F.cross_entropy(logits[:, lo:hi], batch.y - lo))
    if scenario == "class":
        assert task.units == (0, stream.n_outputs) and hi < stream.n_outputs


def test_lwf_warm_up_is_mammoths():
    """Only the new task's head rows change, as SGD on the classifier with the features frozen over the
    same shuffled batches (mammoth begin_task)."""
    stream = _stream("class", n_tasks=3, active_units="all")
    model = _model(stream)
    lwf = build_method("lwf", 1.0, {"warmup_epochs": 2, "warmup_lr": 0.1, "warmup_batch": 7})
    lwf.setup(model, stream, seed=3)
    lwf.before_task(model, stream[0])
    ref = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = stream[1]
    lwf.before_task(model, task)
    # literal: SGD over the whole classifier, outputs masked to the new task's units
    gen = task_generator(3, LWF_STREAM)
    opt = torch.optim.SGD(ref.head.parameters(), lr=0.1)
    lo, hi = task.own_units
    ref.eval()
    for _ in range(2):
        for idx in torch.randperm(task.n_train, generator=gen).split(7):
            opt.zero_grad()
            with torch.no_grad():
                feats = ref.body(task.x_train[idx])
            loss = F.cross_entropy(ref.head(feats)[:, lo:hi], task.y_train[idx] - lo)
            loss.backward()
            opt.step()
    after = model.state_dict()
    for k in before:
        if k.startswith("head."):
            assert torch.equal(after[k][:lo], before[k][:lo]) and torch.equal(after[k][hi:], before[k][hi:])
            assert not torch.equal(after[k][lo:hi], before[k][lo:hi])
            assert torch.allclose(after[k], ref.state_dict()[k], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(after[k], before[k])
    assert model.training  # the model's mode is left as found


# ---------------------------------------------------------------------------------------- iCaRL
def mammoth_herding(feats: torch.Tensor, count: int) -> list[int]:
    """mammoth c66408f fill_buffer's loop for one class, literally."""
    feats = feats.clone()
    mean_feat = feats.mean(0, keepdim=True)
    running_sum = torch.zeros_like(mean_feat)
    chosen, i = [], 0
    while i < count and i < feats.shape[0]:
        cost = (mean_feat - (feats + running_sum) / (i + 1)).norm(2, 1)
        idx_min = cost.argmin().item()
        chosen.append(idx_min)
        running_sum += feats[idx_min : idx_min + 1]
        feats[idx_min] = feats[idx_min] + 1e6
        i += 1
    return chosen


def test_herding_equals_mammoths_loop():
    gen = torch.Generator().manual_seed(0)
    sizes = [9, 14, 5]
    feats = [torch.randn(n, 6, generator=gen) for n in sizes]
    padded = torch.zeros(3, 14, 6)
    valid = torch.zeros(3, 14, dtype=torch.bool)
    for c, f in enumerate(feats):
        padded[c, : len(f)], valid[c, : len(f)] = f, True
    got = herding(padded, valid, 7)
    for c, f in enumerate(feats):
        want = mammoth_herding(f, 7)
        assert got[c, : len(want)].tolist() == want


def test_icarl_memory_loss_and_nearest_mean():
    stream = _stream("class", n_tasks=3, active_units="all")
    model = _model(stream)
    icarl = build_method("icarl", None, {"buffer_size": 10, "normalize_features": False, "exemplar_inputs": "stored"})
    icarl.setup(model, stream, seed=0)

    def features(x):
        with torch.no_grad(), eval_mode(model):
            return model.body(x)

    icarl.before_task(model, stream[0])
    icarl.after_task(model, stream[0])
    mem = icarl.memory
    assert mem["y"].tolist() == [0] * 5 + [1] * 5  # 10 // 2 classes
    first = {}
    for c in (0, 1):
        xs = stream[0].x_train[stream[0].y_train == c]
        first[c] = xs[mammoth_herding(features(xs), 5)]
        assert torch.equal(mem["x"][mem["y"] == c], first[c])
    # task 1: training data = task + exemplars; BCE with the old model's sigmoids on old units
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    old = copy.deepcopy(model).eval()
    icarl.before_task(model, stream[1])
    data = icarl.training_data(stream, 1)
    assert len(data) == stream[1].n_train + 10 and torch.equal(data.x[-10:], mem["x"])
    batch = Batch(data.x[-12:], data.y[-12:], data.units, None, 1)
    logits = model(batch.x)
    eye = torch.eye(stream.n_outputs)  # mammoth get_loss, literally (pc = 2, ac = 4)
    comb = torch.cat((torch.sigmoid(old(batch.x))[:, :2], eye[batch.y][:, 2:4]), dim=1)
    want = F.binary_cross_entropy_with_logits(logits[:, :4], comb)
    assert torch.allclose(icarl.task_loss(batch, logits), want, rtol=1e-6)
    icarl.after_task(model, stream[1])
    mem = icarl.memory
    assert mem["y"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # 10 // 4 each; the old classes keep their first two
    for c in (0, 1):
        assert torch.equal(mem["x"][mem["y"] == c], first[c][:2])
    for c in (2, 3):
        xs = stream[1].x_train[stream[1].y_train == c]
        assert torch.equal(mem["x"][mem["y"] == c], xs[mammoth_herding(features(xs), 2)])
    # nearest mean of exemplars (mammoth compute_class_means + forward), by hand
    scorer = icarl.evaluator(model, 1)
    x = stream[2].x_test[:6]
    means = torch.stack([features(mem["x"][mem["y"] == c]).mean(0) for c in range(4)])
    dist = ((means[None] - features(x)[:, None]) ** 2).sum(2)
    scores = scorer(x)
    assert torch.allclose(scores[:, :4], -dist, rtol=1e-5, atol=1e-6)
    assert torch.isinf(scores[:, 4:]).all()
    assert model.training
    # the last task: its exemplars selected by the evaluator, the memory left as it was
    before = {k: v.clone() for k, v in icarl.memory.items()}
    last = icarl.evaluator(model, 2)
    assert torch.isfinite(last(x)).all()
    assert all(torch.equal(before[k], icarl.memory[k]) for k in before)


def test_icarl_normalized_features_and_mammoths_uint8_exemplars():
    stream = _stream("class", n_tasks=2)
    model = _model(stream)
    icarl = build_method(
        "icarl", None, {"buffer_size": 6, "normalize_features": True, "exemplar_inputs": "uint8_truncated"}
    )
    icarl.setup(model, stream, seed=0)
    icarl.before_task(model, stream[0])
    icarl.after_task(model, stream[0])

    def features(x):
        with torch.no_grad(), eval_mode(model):
            return F.normalize(model.body(x), dim=1)

    mem = icarl.memory
    for c in (0, 1):
        xs = stream[0].x_train[stream[0].y_train == c]
        assert torch.equal(mem["x"][mem["y"] == c], xs[mammoth_herding(features(xs), 3)])
    x_ex = icarl.training_data(stream, 1).x[-6:]
    assert torch.equal(x_ex, (mem["x"] == 1.0).float() / 255)  # uint8 of a [0, 1] image: only 1.0 survives
    means = F.normalize(torch.stack([features(mem["x"][mem["y"] == c]).mean(0) for c in (0, 1)]), dim=1)
    x = stream[1].x_test[:5]
    want = -((means[None] - features(x)[:, None]) ** 2).sum(2)
    assert torch.allclose(icarl.evaluator(model, 0)(x)[:, :2], want, atol=1e-6)


# ---------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "method, key, value",
    [
        ("lwf", "temperature", 0),
        ("lwf", "ce_units", "all"),
        ("lwf", "warmup_epochs", -1),
        ("lwf", "warmup_batch", 0),
        ("lwf", "wd_reg", -1.0),
        ("agem", "buffer_size", 0),
        ("agem", "replay_batch", None),
        ("gem", "margin", -0.5),
        ("gem", "eps", 0.0),
        ("icarl", "buffer_size", 1.5),
        ("icarl", "normalize_features", "yes"),
        ("icarl", "exemplar_inputs", "uint8"),
    ],
)
def test_bad_options_are_one_line(method, key, value):
    with pytest.raises(ValueError, match=f"^method.{key}") as e:
        build_method(method, 1.0 if method == "lwf" else None, {key: value})
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------- on a stream
RUN = ["benchmark=split_digits", "scenario=class", "epochs=1", "device=cpu", "threads=1"]


@pytest.fixture(scope="module")
def finetune_acc(tmp_path_factory):
    cache = {}

    def get(seed):
        if seed not in cache:
            cfg = compose_config(*RUN, "method=finetune", f"seed={seed}")
            with contextlib.redirect_stdout(io.StringIO()):
                cache[seed] = run_experiment(cfg, tmp_path_factory.mktemp(f"finetune{seed}"))["acc"]
        return cache[seed]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("method", ["agem", "gem", "icarl"])
def test_memory_methods_beat_finetune_on_split_digits_class_il(method, finetune_acc, tmp_path, one_thread):
    """Class-IL split digits (5 × 2 classes, 1 epoch, memory 200): finetune keeps the last task only."""
    for seed in (0, 1):
        cfg = compose_config(*RUN, f"method={method}", "method.buffer_size=200", f"seed={seed}")
        with contextlib.redirect_stdout(io.StringIO()):
            acc = run_experiment(cfg, tmp_path / f"{method}{seed}")["acc"]
        assert acc >= finetune_acc(seed) + 0.2, (seed, acc, finetune_acc(seed))


RESUME = {
    "lwf": (1.0, {"warmup_epochs": 1, "warmup_lr": 0.05, "warmup_batch": 16, "wd_reg": 1e-4, "ce_units": "seen"}),
    "agem": (None, {"buffer_size": 30, "replay_batch": 8}),
    "gem": (None, {"buffer_size": 30}),
    "icarl": (None, {"buffer_size": 20, "normalize_features": False, "exemplar_inputs": "uint8_truncated"}),
}


def _trainer(stream, method, seed=0, checkpoint=None):
    cfg = compose_config("model=mlp", "model.hidden=[16]", "optimizer=sgd", "optimizer.lr=0.05")
    torch.manual_seed(seed)
    model = build_model(cfg.model, stream.input_shape, stream.n_outputs)
    strength, options = RESUME[method]
    m = build_method(method, strength, options)
    opt = make_optimizer_factory(cfg.optimizer)
    return Trainer(model, m, stream, opt, batch_size=16, epochs=1, seed=seed, checkpoint=checkpoint)


@pytest.mark.parametrize("method", sorted(RESUME))
def test_resume_after_task_one_gives_the_same_matrix(method, one_thread):
    stream = _stream("class", n_tasks=3, active_units="all", per_task=80)
    saved = []

    def keep(state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        saved.append(buffer.getvalue())

    full = _trainer(stream, method, checkpoint=keep).run()
    after_first = torch.load(io.BytesIO(saved[0]), weights_only=True)  # loads without unpickling code
    resumed = _trainer(stream, method).run(resume=after_first)
    assert resumed.matrix == full.matrix  # bitwise
    assert _trainer(stream, method, seed=1).run().matrix != full.matrix
