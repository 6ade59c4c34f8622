"""RWalk and SCP (issue 12): importance against brute-force loops, RWalk's score on a path known in
closed form, and option checks. Both beating finetune's BWT on the default stream over 3 seeds is
tests/test_defaults.py's.
λ = 0 ≡ finetune and "importance passes leave the model and RNG as found" are tests/test_contract.py's
(it iterates configs/method/*.yaml)."""

from __future__ import annotations

import hydra
import pytest
import torch
from torch import nn

from cl_runner.data.stream import Task
from cl_runner.methods import build_method
from cl_runner.methods.scp import random_slices
from cl_runner.seeding import task_generator


def make_task(x, y, task_id=0, units=(0, 3)):
    return Task(task_id, f"t{task_id}", x, y, x[:4], y[:4], list(range(units[0], units[1])), units, units)


def net(seed=0, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out))


# ---- RWalk ------------------------------------------------------------------------------------------


def rwalk_brute_force(path, grads, alpha, update_every, eps, fisher0):
    """Score and Fisher of one task by explicit Python loops over steps and entries (eq. 6–7):
    path[k] = θ_k (k = 0..K), grads[k] = task-loss gradient at θ_k (k = 0..K−1); flat lists."""
    p = len(path[0])
    fisher, score = list(fisher0), [0.0] * p
    omega, sq, start, steps = [0.0] * p, [0.0] * p, list(path[0]), 0
    clamped = 0
    for k in range(len(grads)):
        for i in range(p):
            omega[i] += -grads[k][i] * (path[k + 1][i] - path[k][i])
            sq[i] += grads[k][i] ** 2
        steps += 1
        last = k == len(grads) - 1
        if steps == update_every or last:
            for i in range(p):
                fisher[i] = (1 - alpha) * fisher[i] + alpha * sq[i] / steps
                d = path[k + 1][i] - start[i]
                ratio = omega[i] / (0.5 * fisher[i] * d * d + eps)
                clamped += ratio < 0
                score[i] += max(0.0, ratio)
            omega, sq, start, steps = [0.0] * p, [0.0] * p, list(path[k + 1]), 0
    return fisher, score, clamped


def drive(method, model, path, grads, task):
    """Walk ``model`` along ``path`` with the given task-loss gradients through the method's hooks."""
    params = list(model.parameters())
    method.before_task(model, task)
    for k, g in enumerate(grads):
        for p, gk in zip(params, g, strict=True):
            p.grad = gk.clone()
        method.after_backward(model)
        with torch.no_grad():
            for p, theta in zip(params, path[k + 1], strict=True):
                p.copy_(theta)
        method.after_step(model)


def random_walk(model, n_steps, seed):
    g = torch.Generator().manual_seed(seed)
    start = [p.detach().clone() for p in model.parameters()]
    path, grads = [start], []
    for _ in range(n_steps):
        grad = [torch.randn(p.shape, generator=g) for p in start]
        # a descent step with noise: mostly positive ω, some negative (clamped to 0)
        step = [-0.05 * gk + 0.1 * torch.randn(p.shape, generator=g) for gk, p in zip(grad, start, strict=True)]
        path.append([a + b for a, b in zip(path[-1], step, strict=True)])
        grads.append(grad)
    return path, grads


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors]).double().tolist()


@pytest.mark.parametrize("update_every, n_steps", [(1, 7), (3, 10), (4, 8)])
def test_rwalk_score_and_fisher_equal_brute_force(update_every, n_steps):
    model = net()
    task = make_task(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    m = build_method("rwalk", 1.0, {"alpha": 0.7, "update_every": update_every, "eps": 1e-3})
    m.setup(model, None)
    names = [n for n, _ in model.named_parameters()]
    fisher0 = [0.0] * sum(p.numel() for p in model.parameters())
    prev_score = None
    for t, seed in enumerate((1, 2)):  # two tasks: the Fisher runs on, the scores are averaged
        path, grads = random_walk(model, n_steps, seed)
        drive(m, model, path, grads, make_task(task.x_train, task.y_train, t))
        want_f, want_s, clamped = rwalk_brute_force(
            [flat(p) for p in path], [flat(g) for g in grads], 0.7, update_every, 1e-3, fisher0
        )
        m.after_task(model, make_task(task.x_train, task.y_train, t))
        got_f = flat([m.fisher()[n] for n in names])
        got_s = flat([m.scores()[0][n] for n in names])
        assert got_f == pytest.approx(want_f, rel=1e-4, abs=1e-9)
        assert got_s == pytest.approx(want_s, rel=1e-4, abs=1e-6)
        assert max(want_s) > 0 and clamped > 0  # the walk has windows that add and windows clamped to 0
        combined = want_s if prev_score is None else [(a + b) / 2 for a, b in zip(prev_score, want_s, strict=True)]
        assert flat([m.scores()[1][n] for n in names]) == pytest.approx(combined, rel=1e-4, abs=1e-6)
        # the penalty weight: both min–max normalized over the whole network, then added
        f, s = torch.tensor(want_f), torch.tensor(combined)
        want_imp = (f - f.min()) / (f.max() - f.min()) + (s - s.min()) / (s.max() - s.min())
        assert flat([m.importance()[n] for n in names]) == pytest.approx(want_imp.tolist(), rel=1e-4, abs=1e-6)
        fisher0, prev_score = want_f, combined


def test_rwalk_score_on_a_known_path():
    """One parameter walking in a straight line, θ_k = k·d, under a constant gradient g (a linear
    loss): per window of n steps ω = −g·d·n, Δθ = n·d, the window's mean g² = g², so with F_0 = 0
    F_w = (1 − (1 − α)^w) g² and s = Σ_w −g d n / (½ F_w n² d² + ε) in closed form."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    g, d, n, windows, alpha, eps = -2.0, 0.01, 5, 4, 0.5, 1e-3
    m = build_method("rwalk", 1.0, {"alpha": alpha, "update_every": n, "eps": eps})
    m.setup(model, None)
    path = [[torch.full((1, 1), k * d)] for k in range(n * windows + 1)]
    grads = [[torch.full((1, 1), g)] for _ in range(n * windows)]
    drive(m, model, path, grads, make_task(torch.randn(4, 1), torch.zeros(4, dtype=torch.long), units=(0, 1)))
    fisher = [(1 - (1 - alpha) ** w) * g * g for w in range(1, windows + 1)]
    want_s = sum(-g * d * n / (0.5 * f * (n * d) ** 2 + eps) for f in fisher)
    assert m.scores()[0]["weight"].item() == pytest.approx(want_s, rel=1e-5)
    assert m.fisher()["weight"].item() == pytest.approx((1 - (1 - alpha) ** windows) * g * g, rel=1e-6)
    # walking uphill (the loss grows) scores 0, not a negative importance
    m2 = build_method("rwalk", 1.0, {"alpha": alpha, "update_every": n, "eps": eps})
    m2.setup(model, None)
    with torch.no_grad():
        model.weight.zero_()
    drive(m2, model, path, [[-gk[0]] for gk in grads], make_task(torch.randn(4, 1), torch.zeros(4, dtype=torch.long)))
    assert m2.scores()[0]["weight"].item() == 0.0


def test_rwalk_in_the_trainer_uses_the_task_gradient_and_penalizes():
    """Through the real trainer: the score and Fisher grow during a task, the penalty is zero at the
    anchor and positive once the parameters move."""
    from cl_runner.data.stream import TaskStream
    from cl_runner.trainer import Trainer

    torch.manual_seed(0)
    model = net()
    tasks = [make_task(torch.randn(64, 4), torch.randint(0, 3, (64,)), t) for t in range(2)]
    stream = TaskStream("toy", "domain", tasks, 3, (4,))
    m = build_method("rwalk", 10.0, {})
    Trainer(model, m, stream, lambda mod: torch.optim.SGD(mod.parameters(), lr=0.1), batch_size=16, epochs=2).run()
    assert m.n_tasks == 1  # the trainer consolidates after each task but the last
    m.after_task(model, tasks[1])  # what it would do after task 2 of a longer stream
    assert m.n_tasks == 2
    imp = m.importance()
    assert all(torch.isfinite(v).all() for v in imp.values())
    assert max(v.max().item() for v in imp.values()) >= 0.999  # F̂ and ŝ each reach 1 somewhere
    assert min(v.min().item() for v in imp.values()) >= 0.0
    assert all(v.abs().sum() > 0 for v in m.fisher().values())
    assert m.penalty(model).item() == 0.0  # at the anchor
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    assert m.penalty(model).item() > 0


# ---- SCP --------------------------------------------------------------------------------------------


def scp_brute_force(model, x, units, slices):
    """Γ by a loop over slices with plain autograd on the whole-data mean output."""
    lo, hi = units
    gamma = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for xi in slices:
        model.zero_grad()
        (model(x)[:, lo:hi].mean(0) @ xi).backward()
        for n, p in model.named_parameters():
            gamma[n] += p.grad.square() / len(slices)
    model.zero_grad()
    return gamma


@pytest.mark.parametrize("n_slices", [3, 7])  # fewer / more slices than the K = 5 active outputs
@pytest.mark.parametrize("batch", [4, 1024])
def test_scp_gamma_equals_a_loop_over_slices(n_slices, batch):
    model = net(out=8)
    x, units = torch.randn(13, 4), (2, 7)
    task = make_task(x, torch.randint(2, 7, (13,)), task_id=3, units=units)
    m = build_method("scp", 1.0, {"n_slices": n_slices, "scp_batch": batch})
    m.setup(model, None, seed=5)
    m.after_task(model, task)
    g = task_generator(5, 3)
    slices = random_slices(n_slices, 5, g)
    assert torch.allclose(slices.norm(dim=1), torch.ones(n_slices))
    want = scp_brute_force(model, x, units, slices)
    for n, w in want.items():
        assert torch.allclose(m.importance()[n], w, rtol=1e-4, atol=1e-9), n
    # the slices differ between tasks and seeds (drawn per (seed, task)), not from the global RNG
    assert not torch.equal(random_slices(n_slices, 5, task_generator(5, 4)), slices)


@pytest.mark.parametrize("decay", [None, 0.3])
def test_scp_accumulates_over_tasks(decay):
    model = net()
    m = build_method("scp", 1.0, {"decay": decay, "n_slices": 4})
    m.setup(model, None, seed=0)
    tasks = [make_task(torch.randn(6, 4), torch.randint(0, 3, (6,)), t) for t in range(2)]
    parts = []
    for task in tasks:
        parts.append(m.task_importance(model, task))
        m.after_task(model, task)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05)
    for n, got in m.importance().items():
        a, b = parts[0][n], parts[1][n]
        want = a + b if decay is None else decay * (1 - decay) * a + (1 - decay) * b
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("rwalk", {"alpha": 0.0}, "method.alpha"),
        ("rwalk", {"update_every": 0}, "method.update_every"),
        ("rwalk", {"eps": 0}, "method.eps"),
        ("scp", {"n_slices": 0}, "method.n_slices"),
        ("scp", {"decay": 1.0}, "method.decay"),
        ("scp", {"decay": -0.1}, "method.decay"),
        ("scp", {"scp_samples": 0}, "method.scp_samples"),
    ],
)
def test_bad_options_name_the_key(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_method(name, 1.0, options)


# ---- preset regularizers_rotated_mnist_mlp400_domain (docs/protocols/regularizers.md) ---------------

REGULARIZERS = "regularizers_rotated_mnist_mlp400_domain"
D4_METHODS = ("finetune", "ewc", "mas", "si", "rwalk", "scp", "joint")


@pytest.mark.parametrize("method", D4_METHODS)
def test_regularizers_preset_follows_its_protocol(method):
    from omegaconf import OmegaConf

    with hydra.initialize_config_module("cl_runner.configs", version_base="1.3"):
        cfg = hydra.compose("config", overrides=[f"experiment={REGULARIZERS}", f"method={method}"])
        bare = hydra.compose("config", overrides=[f"method={method}"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    assert cfg["benchmark"]["name"] == "rotated_mnist" and cfg["benchmark"]["angles"] == [0, 20, 40, 60, 80]
    assert cfg["scenario"] == "domain"
    assert cfg["model"]["name"] == "mlp" and cfg["model"]["hidden"] == [400, 400]
    assert cfg["method"]["name"] == method
    # every regularizer has a strength stated in configs/protocol/<preset>/<method>.yaml
    from importlib import resources

    protocol = resources.files("cl_runner.configs") / "protocol" / REGULARIZERS / f"{method}.yaml"
    if method in ("finetune", "joint"):
        assert cfg["lambda"] in (None, 0) and not protocol.is_file()
    else:
        assert protocol.is_file()
        assert cfg["lambda"] == OmegaConf.load(str(protocol))["lambda"] > 0
        assert set(cfg["method"]) == set(OmegaConf.to_container(bare, resolve=True)["method"])
