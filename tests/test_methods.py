"""The methods' math on small models: importance passes against brute-force Python loops, the
penalty's exact form, SI against a closed form, and state left untouched by importance passes."""

from __future__ import annotations

import copy

import hydra
import pytest
import torch
from conftest import defaults
from omegaconf import OmegaConf
from torch import nn

from cl_runner.curvature import FISHER_LABELS, fisher_diagonal, fisher_labels, mas_importance
from cl_runner.curvature import estimators as ps
from cl_runner.data.stream import Task, TaskStream, assign_units
from cl_runner.methods import build_method, eval_mode
from cl_runner.methods.ewc import EWC
from cl_runner.methods.l2 import L2
from cl_runner.methods.mas import MAS
from cl_runner.methods.online_ewc import OnlineEWC
from cl_runner.methods.si import SI
from cl_runner.models import MLP
from cl_runner.seeding import task_generator

SHAPE = (1, 3, 3)
N_OUT = 6
UNITS = (2, 5)  # a strict sub-range of the outputs: restriction to the task's units is exercised


def make_model(seed: int = 0, batch_norm: bool = True, dropout: float = 0.3) -> nn.Module:
    torch.manual_seed(seed)
    model = MLP(SHAPE, N_OUT, hidden=[5, 4], batch_norm=batch_norm, dropout=dropout).double()
    if batch_norm:  # non-trivial running statistics, so eval mode differs from train mode
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    return model


def make_task(tid: int = 0, n: int = 23, units: tuple[int, int] = UNITS, seed: int = 1) -> Task:
    g = torch.Generator().manual_seed(seed + 100 * tid)
    x = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    y = torch.randint(units[0], units[1], (n,), generator=g)
    return Task(tid, f"t{tid}", x, y, x[:5], y[:5], list(range(units[1] - units[0])), units, units)


def brute_fisher(model, x, labels, units, exact=False):
    """Python loop over samples (and, for the exact Fisher, over classes) with .backward()."""
    lo, hi = units
    model = copy.deepcopy(model)
    model.eval()
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        classes = range(hi - lo) if exact else [int(labels[i])]
        for c in classes:
            model.zero_grad()
            logp = torch.log_softmax(model(x[i : i + 1])[0, lo:hi], -1)
            weight = logp[c].exp().item() if exact else 1.0
            logp[c].backward()
            for n, p in model.named_parameters():
                out[n] += weight * p.grad**2
    return {n: v / len(x) for n, v in out.items()}


def brute_mas(model, x, units, batch=None):
    """per-sample |∂‖f‖²/∂θ| mean (batch None), or Hsu's |∂ mean(f²)/∂θ| mean over batches."""
    lo, hi = units
    model = copy.deepcopy(model)
    model.eval()
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    chunks = [x[i : i + 1] for i in range(len(x))] if batch is None else list(x.split(batch))
    for xb in chunks:
        model.zero_grad()
        z = model(xb)[:, lo:hi]
        (z.pow(2).sum() if batch is None else z.pow(2).mean()).backward()
        for n, p in model.named_parameters():
            out[n] += p.grad.abs()
    return {n: v / len(chunks) for n, v in out.items()}


def assert_dicts_close(a, b, rtol=1e-9, atol=1e-12):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=n)


def perturb(model: nn.Module, scale: float, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(scale * d[n])
    return d


def train_steps(model, method, task, steps=5, lr=0.05, strength=None):
    """The trainer's call sequence (cl_runner/methods/base.py) with plain SGD."""
    strength = method.strength if strength is None else strength
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    method.before_task(model, task)
    lo, hi = task.units
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(task.x_train)[:, lo:hi], task.y_train - lo).backward()
        method.after_backward(model)
        pen = method.penalty(model)
        if pen is not None:
            (strength * pen).backward()
        opt.step()
        method.after_step(model)
    method.after_task(model, task)


# ---- Fisher ---------------------------------------------------------------------------------------


@pytest.fixture
def path_taken(monkeypatch):
    """Records which implementation each importance pass used: 'fast' (closed form) or 'func'."""
    taken = []
    real = ps._linear_pass

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        taken.append("func" if out is None else "fast")
        return out

    monkeypatch.setattr(ps, "_linear_pass", spy)
    return taken


@pytest.mark.parametrize("path", ["func", "fast"])
@pytest.mark.parametrize("labels", FISHER_LABELS)
def test_fisher_equals_brute_force_loop(labels, path, path_taken):
    # batch norm has affine parameters, so that model goes through torch.func; the plain MLP
    # (dropout kept: eval mode must switch it off) through the Linear closed form
    model, task = make_model(batch_norm=path == "func"), make_task()
    model.train()  # the pass must switch to eval mode by itself
    ewc = EWC(1.0, **defaults("ewc", fisher_labels=labels, fisher_batch=4))
    ewc.after_task(model, task)
    lo = task.units[0]
    x, y = task.x_train, task.y_train
    if labels == "true":
        lab = y - lo
    elif labels == "pred":  # argmax of each sample on its own
        with eval_mode(model), torch.no_grad():
            lab = torch.stack([model(x[i : i + 1])[0, lo : task.units[1]].argmax() for i in range(len(x))])
    else:  # sample: the same draws (same seeded generator); "all" ignores labels
        with eval_mode(model):
            lab = fisher_labels(model, x, y, task.units, "sample", task_generator(0, task.id))
    expected = brute_fisher(model, x, lab, task.units, exact=labels == "all")
    assert_dicts_close(ewc.importance(), expected)
    # outputs outside the task's units get no Fisher
    assert ewc.importance()["head.weight"][: task.units[0]].abs().max() == 0
    assert ewc.importance()["head.weight"][task.units[1] :].abs().max() == 0
    assert all(v.sum() > 0 for n, v in ewc.importance().items() if not n.startswith("head"))
    assert path_taken == [path]


class SmallConv(nn.Module):
    """Every parameter in a Conv2d or Linear: EWC's diagonal takes the per-layer einsum path."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)
        self.head = nn.Linear(8, N_OUT)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("labels", FISHER_LABELS)
def test_conv_fisher_by_layers_equals_brute_force_loop(labels, monkeypatch):
    from cl_runner.curvature import estimators as curvature

    taken = []
    real = curvature.diagonal_by_layers

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(curvature, "diagonal_by_layers", spy)
    torch.manual_seed(0)
    model, task = SmallConv().double(), make_task()
    ewc = EWC(1.0, **defaults("ewc", fisher_labels=labels, fisher_batch=4))
    ewc.after_task(model, task)
    x, y = task.x_train, task.y_train
    if labels == "true":
        lab = y - task.units[0]
    elif labels == "pred":
        with torch.no_grad():
            lab = model(x)[:, task.units[0] : task.units[1]].argmax(1)
    else:
        lab = fisher_labels(model, x, y, task.units, "sample", task_generator(0, task.id))
    assert_dicts_close(ewc.importance(), brute_fisher(model, x, lab, task.units, exact=labels == "all"))
    assert taken == [True]


def test_fisher_labels_differ_and_chunking_is_irrelevant():
    model, task = make_model(), make_task()
    with eval_mode(model):
        ref = {
            lab: fisher_diagonal(
                model, task.x_train, task.y_train, task.units, lab, batch=1000, generator=task_generator(0, 0)
            )
            for lab in FISHER_LABELS
        }
        for batch in (1, 3):
            for lab in FISHER_LABELS:
                got = fisher_diagonal(
                    model, task.x_train, task.y_train, task.units, lab, batch=batch, generator=task_generator(0, 0)
                )
                assert_dicts_close(got, ref[lab])
    # the modes are genuinely different estimators on this model
    w = {lab: ref[lab]["body.1.weight"] for lab in FISHER_LABELS}
    assert not torch.allclose(w["true"], w["pred"]) and not torch.allclose(w["pred"], w["all"])


def test_sampled_labels_follow_softmax_and_leave_global_rng():
    model = make_model(batch_norm=False, dropout=0.0)
    probs = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[2:5] = probs.log()
    x = torch.randn(20000, *SHAPE, dtype=torch.float64)
    rng = torch.get_rng_state()
    lab = fisher_labels(model, x, None, UNITS, "sample", torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), rng)
    freq = torch.bincount(lab, minlength=3).double() / len(lab)
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    again = fisher_labels(model, x, None, UNITS, "sample", torch.Generator().manual_seed(3))
    assert torch.equal(lab, again)


def test_fisher_samples_uses_a_seeded_subset():
    model, task = make_model(), make_task(n=40)
    a, b, full = (
        EWC(1.0, **defaults("ewc", fisher_labels="pred", fisher_samples=9)),
        EWC(1.0, **defaults("ewc", fisher_labels="pred", fisher_samples=9)),
        EWC(1.0, **defaults("ewc", fisher_labels="pred")),
    )
    for m in (a, b, full):
        m.after_task(model, task)
    assert_dicts_close(a.importance(), b.importance(), rtol=0, atol=0)  # deterministic
    idx = torch.randperm(40, generator=task_generator(0, task.id))[:9]
    with eval_mode(model), torch.no_grad():
        lab = model(task.x_train[idx])[:, 2:5].argmax(1)
    assert_dicts_close(a.importance(), brute_fisher(model, task.x_train[idx], lab, task.units))
    assert not torch.allclose(a.importance()["body.1.weight"], full.importance()["body.1.weight"])


# ---- penalties ------------------------------------------------------------------------------------


def consolidated(name: str, model: nn.Module, task: Task, **kw):
    old_default = {"fisher_labels": "pred"} if "ewc" in name else {}  # what the constructor's default was
    cls = {"l2": L2, "ewc": EWC, "online_ewc": OnlineEWC, "mas": MAS, "si": SI}[name]
    method = cls(strength=1.0, **defaults(name, **{**old_default, **kw}))
    method.setup(model, None)
    assert method.penalty(model) is None  # nothing consolidated yet
    if name == "si":
        train_steps(model, method, task)  # SI needs a path to integrate
    else:
        method.after_task(model, task)
    return method


@pytest.mark.parametrize("name", ["l2", "ewc", "online_ewc", "mas", "si"])
def test_penalty_zero_at_anchor_and_quadratic_away_from_it(name):
    model, task = make_model(dropout=0.0), make_task()
    method = consolidated(name, model, task)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert method.penalty(model).item() == 0.0
    imp = method.importance() or {n: torch.ones_like(a) for n, a in anchor.items()}
    scale = 0.5 if getattr(method, "half", False) else 1.0
    values = []
    for eps in (1e-2, 2e-2):
        for n, p in model.named_parameters():
            p.data.copy_(anchor[n])
        perturb(model, eps)
        pen = method.penalty(model)
        expected = scale * sum((imp[n] * (p.detach() - anchor[n]) ** 2).sum() for n, p in model.named_parameters())
        torch.testing.assert_close(pen.detach(), expected)
        values.append(pen.item())
        # the gradient the trainer will add: 2·s·Ω·(θ − θ*)
        grads = torch.autograd.grad(pen, list(model.parameters()))
        for (n, p), g in zip(model.named_parameters(), grads, strict=True):
            torch.testing.assert_close(g, 2 * scale * imp[n] * (p.detach() - anchor[n]))
    assert values[0] > 0
    assert values[1] == pytest.approx(4 * values[0], rel=1e-9)


def test_l2_equals_ewc_with_unit_fisher():
    class UnitEWC(EWC):
        def fisher(self, model, task):
            return {n: torch.ones_like(p) for n, p in model.named_parameters()}

    model, task = make_model(), make_task()
    l2, ewc = L2(1.0), UnitEWC(1.0, **defaults("ewc", fisher_labels="pred", half=False))
    l2.after_task(model, task)
    ewc.after_task(model, task)
    perturb(model, 0.1)
    pl, pe = l2.penalty(model), ewc.penalty(model)
    torch.testing.assert_close(pl, pe, rtol=0, atol=0)
    for gl, ge in zip(
        torch.autograd.grad(pl, list(model.parameters())),
        torch.autograd.grad(pe, list(model.parameters())),
        strict=True,
    ):
        torch.testing.assert_close(gl, ge, rtol=0, atol=0)
    assert l2.importance() == {}


def test_ewc_keeps_one_term_per_task_and_half_factor():
    model = make_model(dropout=0.0)
    full, half = (
        EWC(1.0, **defaults("ewc", fisher_labels="pred", half=False)),
        EWC(1.0, **defaults("ewc", fisher_labels="pred", half=True)),
    )
    anchors, fishers = [], []
    for t in range(3):
        perturb(model, 0.3, seed=t)
        task = make_task(t)
        for m in (full, half):
            m.after_task(model, task)
        anchors.append({n: p.detach().clone() for n, p in model.named_parameters()})
        fishers.append(full.importance())
        assert_dicts_close(full.importance(), half.importance(), rtol=0, atol=0)
    assert full.n_terms == 3
    perturb(model, 0.2, seed=11)
    expected = sum(
        (f[n] * (p.detach() - a[n]) ** 2).sum()
        for a, f in zip(anchors, fishers, strict=True)
        for n, p in model.named_parameters()
    )
    pen = full.penalty(model)
    torch.testing.assert_close(pen.detach(), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(half.penalty(model).detach(), 0.5 * expected, rtol=1e-12, atol=0)
    # the merged quadratic has the gradient of the sum of the per-task terms
    grads = torch.autograd.grad(pen, list(model.parameters()))
    for (n, p), g in zip(model.named_parameters(), grads, strict=True):
        expected_g = sum(2 * f[n] * (p.detach() - a[n]) for a, f in zip(anchors, fishers, strict=True))
        torch.testing.assert_close(g, expected_g, rtol=1e-10, atol=1e-15)
    # head rows of no task (zero Fisher everywhere) stay out of it
    assert (full._weight["head.weight"][:2] == 0).all() and (grads[-2][:2] == 0).all()


@pytest.mark.parametrize("gamma_in_penalty", [False, True])
@pytest.mark.parametrize("half", [False, True])
def test_online_ewc_after_three_tasks_is_the_gamma_weighted_sum(gamma_in_penalty, half):
    gamma = 0.7
    model = make_model(dropout=0.0)
    online = OnlineEWC(
        1.0, **defaults("online_ewc", half=half, gamma=gamma, gamma_in_penalty=gamma_in_penalty, fisher_labels="all")
    )
    fishers = []
    for t in range(3):
        perturb(model, 0.3, seed=t)
        task = make_task(t)
        with eval_mode(model):
            fishers.append(fisher_diagonal(model, task.x_train, task.y_train, task.units, "all"))
        online.after_task(model, task)
        assert online.n_terms == 1
    f1, f2, f3 = fishers
    expected_f = {n: gamma**2 * f1[n] + gamma * f2[n] + f3[n] for n in f1}
    assert_dicts_close(online.importance(), expected_f)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}  # the latest parameters
    assert online.penalty(model).item() == 0.0
    perturb(model, 0.2, seed=12)
    s = (0.5 if half else 1.0) * (gamma if gamma_in_penalty else 1.0)
    expected = s * sum((expected_f[n] * (p.detach() - anchor[n]) ** 2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(online.penalty(model).detach(), expected)


# ---- MAS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("per_sample", [True, False])
def test_mas_equals_brute_force_and_sums_over_tasks(per_sample, batch_norm, path_taken):
    model = make_model(batch_norm=batch_norm)
    mas = MAS(1.0, **defaults("mas", per_sample=per_sample, mas_batch=4))
    t0, t1 = make_task(0, units=(0, 3)), make_task(1, n=17, units=(3, 6))
    mas.after_task(model, t0)
    first = brute_mas(model, t0.x_train, t0.units, None if per_sample else 4)
    assert_dicts_close(mas.importance(), first)
    perturb(model, 0.3)
    mas.after_task(model, t1)
    second = brute_mas(model, t1.x_train, t1.units, None if per_sample else 4)
    assert_dicts_close(mas.importance(), {n: first[n] + second[n] for n in first})
    assert mas.n_terms == 1 and mas.penalty(model).item() == 0.0  # anchored at the latest parameters
    assert path_taken == ([] if not per_sample else ["func" if batch_norm else "fast"] * 2)


class TwiceUsed(nn.Module):
    """A Linear layer applied twice: per-sample gradients are no single outer product."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(9, 9)
        self.head = nn.Linear(9, N_OUT)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


@pytest.mark.parametrize(
    "make_net, expected_path",
    [
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(9, 7), nn.ReLU(inplace=True), nn.Linear(7, N_OUT)), "fast"),
        (
            lambda: nn.Sequential(nn.Flatten(), nn.Linear(9, 7), nn.BatchNorm1d(7, affine=False), nn.Linear(7, N_OUT)),
            "fast",
        ),
        (TwiceUsed, "func"),
    ],
)
def test_fast_path_only_where_exact(make_net, expected_path, path_taken):
    torch.manual_seed(0)
    model, task = make_net().double(), make_task()
    model.eval()
    x, y = task.x_train, task.y_train
    with torch.no_grad():
        lab = model(x)[:, 2:5].argmax(1)
    for labels in ("pred", "all"):
        with eval_mode(model):
            got = fisher_diagonal(model, x, y, task.units, labels)
        assert_dicts_close(got, brute_fisher(model, x, lab, task.units, exact=labels == "all"))
    with eval_mode(model):
        assert_dicts_close(mas_importance(model, x, task.units), brute_mas(model, x, task.units))
    assert path_taken == [expected_path] * 3


def test_mas_chunk_size_is_irrelevant_per_sample():
    model, task = make_model(), make_task()
    with eval_mode(model):
        a = mas_importance(model, task.x_train, task.units, True, batch=1)
        b = mas_importance(model, task.x_train, task.units, True, batch=1000)
    assert_dicts_close(a, b)


# ---- SI -------------------------------------------------------------------------------------------


class Quadratic(nn.Module):
    """L(θ) = Σ_i ½ a_i (θ_i − c_i)²; its gradient descent path is known in closed form."""

    def __init__(self, theta0):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta0, dtype=torch.float64))

    def loss(self, a, c):
        return (0.5 * a * (self.theta - c) ** 2).sum()


def run_si_task(si, model, a, c, lr, steps, strength):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    si.before_task(model, None)
    assert all(w.abs().max() == 0 for w in si.path_integral().values())  # ω reset per task
    for _ in range(steps):
        opt.zero_grad()
        model.loss(a, c).backward()
        si.after_backward(model)
        pen = si.penalty(model)
        if pen is not None:
            (strength * pen).backward()
        opt.step()
        si.after_step(model)
    omega = si.path_integral()["theta"].clone()
    si.after_task(model, None)
    return omega


@pytest.mark.parametrize("grad", ["task", "total"])
def test_si_matches_closed_form_on_a_quadratic(grad):
    a = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    c1 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    theta0 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    lr, steps, xi, lam = 0.1, 20, 0.1, 0.3
    model = Quadratic(theta0.tolist())
    si = SI(lam, **defaults("si", xi=xi, grad=grad))

    # task 1: no penalty, so both gradient choices agree. e_k = θ_k − c = r^k e_0, r = 1 − lr·a,
    # ω = Σ_k lr·g_k² = a·e_0²·(1 − r^{2N}) / (2 − lr·a), Δ = e_0 (r^N − 1)
    omega1 = run_si_task(si, model, a, c1, lr, steps, lam)
    e0, r = theta0 - c1, 1 - lr * a
    w_closed = a * e0**2 * (1 - r ** (2 * steps)) / (2 - lr * a)
    delta = e0 * (r**steps - 1)
    torch.testing.assert_close(omega1, w_closed)
    big_omega1 = w_closed / (delta**2 + xi)
    torch.testing.assert_close(si.importance()["theta"], big_omega1)
    anchor1 = c1 + e0 * r**steps
    torch.testing.assert_close(model.theta.detach(), anchor1)

    # task 2 with the penalty λ·Ω₁(θ − θ*)²: the step recurrence in plain float64 arithmetic
    c2 = torch.tensor([-1.0, 0.0, 3.0], dtype=torch.float64)
    theta, w = anchor1.clone(), torch.zeros(3, dtype=torch.float64)
    for _ in range(steps):
        g_task = a * (theta - c2)
        g_total = g_task + lam * 2 * big_omega1 * (theta - anchor1)
        new = theta - lr * g_total
        w -= (g_task if grad == "task" else g_total) * (new - theta)
        theta = new
    omega2 = run_si_task(si, model, a, c2, lr, steps, lam)
    torch.testing.assert_close(omega2, w)
    torch.testing.assert_close(si.importance()["theta"], big_omega1 + w / ((theta - anchor1) ** 2 + xi))
    assert si.penalty(model).item() == 0.0


def test_si_task_and_total_gradients_differ_once_penalized():
    a = torch.tensor([2.0], dtype=torch.float64)
    out = {}
    for grad in ("task", "total"):
        model, si = Quadratic([0.0]), SI(1.0, **defaults("si", grad=grad))
        run_si_task(si, model, a, torch.tensor([1.0], dtype=torch.float64), 0.1, 10, 1.0)
        out[grad] = run_si_task(si, model, a, torch.tensor([-1.0], dtype=torch.float64), 0.1, 10, 1.0)
    assert not torch.allclose(out["task"], out["total"])


# ---- importance passes leave the model alone ------------------------------------------------------


@pytest.mark.parametrize(
    "make, batch_norm",
    [
        *[
            (lambda lab=lab: EWC(1.0, **defaults("ewc", fisher_labels=lab, fisher_samples=11)), True)
            for lab in FISHER_LABELS
        ],
        (lambda: OnlineEWC(1.0, **defaults("online_ewc", gamma=0.5, fisher_labels="sample")), True),
        (lambda: MAS(1.0, **defaults("mas", per_sample=True, mas_samples=10)), True),
        (lambda: MAS(1.0, **defaults("mas", per_sample=False)), True),
        (lambda: SI(1.0, **defaults("si")), True),
        (lambda: L2(1.0), True),
        # the closed-form path (no affine batch norm): hooks, autograd.grad
        (lambda: EWC(1.0, **defaults("ewc", fisher_labels="all")), False),
        (lambda: OnlineEWC(1.0, **defaults("online_ewc", gamma=0.5, fisher_labels="sample")), False),
        (lambda: MAS(1.0, **defaults("mas")), False),
    ],
)
def test_importance_pass_leaves_model_optimizer_grad_and_rng_unchanged(make, batch_norm):
    model, task = make_model(dropout=0.5, batch_norm=batch_norm), make_task(n=30)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):  # real optimizer state and BatchNorm statistics
        opt.zero_grad()
        nn.functional.cross_entropy(model(task.x_train)[:, 2:5], task.y_train - 2).backward()
        opt.step()
    model.body[5].eval()  # a module with its own flag: must come back as it was, not all-train
    method = make()
    method.before_task(model, task)
    state = copy.deepcopy(model.state_dict())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    opt_state = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()

    method.after_task(model, task)
    first = {n: v.clone() for n, v in method.importance().items()}

    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    assert not any(m._forward_hooks for m in model.modules())
    for k, v in model.state_dict().items():  # parameters, running_mean/var, num_batches_tracked
        assert torch.equal(v, state[k]), k
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    after = opt.state_dict()
    for i, s in opt_state["state"].items():
        for k, v in s.items():
            assert torch.equal(after["state"][i][k], v)
    # dropout was off: a second pass gives the same importance
    if not isinstance(method, (SI, L2)):
        method.after_task(model, task)
        latest = method.importance()
        if isinstance(method, (MAS, OnlineEWC)):  # these accumulate: Ω + Ω, or γ·F̃ + F
            factor = 1 + method.gamma if isinstance(method, OnlineEWC) else 2
            latest = {n: v / factor for n, v in latest.items()}
        assert_dicts_close(latest, first)


# ---- options and configs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, message",
    [
        (
            "ewc",
            {"fisher_labels": "max"},
            "method.fisher_labels='max' is not valid; choose one of: true, pred, sample, all",
        ),
        ("ewc", {"fisher_samples": 0}, "method.fisher_samples=0 must be a positive integer or null (all)"),
        ("ewc", {"half": "yes"}, "method.half='yes' must be true or false"),
        ("online_ewc", {"gamma": 1.5}, "method.gamma=1.5 must be a number in [0, 1]"),
        ("si", {"xi": 0}, "method.xi=0.0 must be a number in (0, inf]"),
        ("si", {"grad": "penalty"}, "method.grad='penalty' is not valid; choose one of: task, total"),
        ("mas", {"mas_batch": -3}, "method.mas_batch=-3 must be a positive integer"),
        ("joint", {"mode": "union"}, "method.mode='union' is not valid; choose one of: cumulative, all"),
        ("l2", {"gamma": 0.9}, "method l2 has no option gamma; valid options: none"),
    ],
)
def test_bad_options_give_one_clear_line(name, options, message):
    with pytest.raises(ValueError) as err:
        build_method(name, None if name == "joint" else 1.0, options)
    assert str(err.value) == message


def compose(*overrides):
    with hydra.initialize_config_module("cl_runner.configs", version_base="1.3"):
        return hydra.compose("config", overrides=list(overrides))


def from_cfg(cfg):
    options = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k not in ("name", "lambda")}
    return build_method(cfg.method.name, cfg["lambda"], options)


def test_configs_defaults_cli_overrides_and_protocol():
    ewc = from_cfg(compose("method=ewc"))
    assert (ewc.strength, ewc.half, ewc.fisher_labels, ewc.fisher_samples) == (1000, True, "all", None)
    ewc = from_cfg(compose("method=ewc", "method.fisher_labels=all", "lambda=5", "method.fisher_samples=100"))
    assert (ewc.strength, ewc.fisher_labels, ewc.fisher_samples) == (5.0, "all", 100)
    assert from_cfg(compose("method=ewc", "method.fisher_labels=true")).fisher_labels == "true"
    online = from_cfg(compose("method=online_ewc", "method.gamma=0.9", "method.gamma_in_penalty=true"))
    assert (online.gamma, online.gamma_in_penalty, online.half) == (0.9, True, True)
    si = from_cfg(compose("method=si", "method.xi=0.2", "method.grad=total"))
    assert (si.xi, si.grad) == (0.2, "total")
    mas = from_cfg(compose("method=mas", "method.per_sample=false"))
    assert mas.per_sample is False
    joint = from_cfg(compose("method=joint", "method.mode=all"))
    assert joint.mode == "all" and joint.strength == 0.0
    # a preset's per-method file (configs/protocol/<experiment>/<method>.yaml) feeds the defaults;
    # the command line still wins
    hsu, vdv = "experiment=hsu2018_split_mnist_domain", "experiment=vandeven2019_permuted_mnist_domain"
    ewc = from_cfg(compose("method=ewc", hsu))
    assert (ewc.strength, ewc.half, ewc.fisher_labels) == (100.0, False, "pred")
    ewc = from_cfg(compose("method=ewc", hsu, "lambda=7", "method.half=true"))
    assert (ewc.strength, ewc.half) == (7.0, True)
    si = from_cfg(compose("method=si", vdv))
    assert (si.strength, si.xi, si.grad) == (5.0, 0.1, "total")
    assert from_cfg(compose("method=si", vdv, "method.grad=task")).grad == "task"


# ---- joint ----------------------------------------------------------------------------------------


def toy_stream(scenario: str, sizes=(4, 6, 5)) -> TaskStream:
    train, own, n_out = assign_units([[2 * t, 2 * t + 1] for t in range(len(sizes))], scenario)
    tasks = []
    for t, n in enumerate(sizes):
        x = torch.full((n, *SHAPE), float(t))
        y = torch.arange(n) % 2 + own[t][0]
        tasks.append(Task(t, f"t{t}", x, y, x, y, [2 * t, 2 * t + 1], train[t], own[t]))
    return TaskStream("toy", scenario, tasks, n_out, SHAPE)


@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_joint_training_data(scenario):
    stream = toy_stream(scenario)
    cumulative, once = build_method("joint", None, {"mode": "cumulative"}), build_method("joint", None, {"mode": "all"})
    for t in range(3):
        data = cumulative.training_data(stream, t)
        assert len(data) == sum((4, 6, 5)[: t + 1])
        torch.testing.assert_close(data.x, torch.cat([stream[k].x_train for k in range(t + 1)]))
        torch.testing.assert_close(data.y, torch.cat([stream[k].y_train for k in range(t + 1)]))
        assert data.units == stream[t].units
        if scenario == "task":
            task_of = data.x[:, 0, 0, 0].long()  # each sample's task id is its pixel value
            expected = torch.tensor([stream[int(k)].units for k in task_of])
            assert torch.equal(data.sample_units.cpu(), expected)
            assert ((data.y >= data.sample_units[:, 0]) & (data.y < data.sample_units[:, 1])).all()
        else:
            assert data.sample_units is None
            assert ((data.y >= data.units[0]) & (data.y < data.units[1])).all()
        data = once.training_data(stream, t)
        assert len(data) == (15 if t == 2 else 0)
    assert cumulative.penalty(None) is None and not cumulative.uses_strength


@pytest.mark.parametrize("name", ["l2", "ewc", "online_ewc", "mas", "si"])
@pytest.mark.parametrize("n_tasks", [1, 3])
def test_fused_penalty_gradient_equals_autograd(name, n_tasks):
    """The trainer's fused add_penalty_grad gives the value and gradient of autograd on penalty()."""
    from cl_runner.data.stream import Task
    from cl_runner.methods import build_method

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4)).double()
    method = build_method(name, 3.0, {"half": True} if "ewc" in name else {})
    x, y = torch.randn(40, 6, dtype=torch.double), torch.randint(0, 4, (40,))
    method.setup(model, None)
    for t in range(n_tasks):
        task = Task(t, f"t{t}", x + t, y, x, y, [0, 1, 2, 3], (0, 4), (0, 4))
        method.before_task(model, task)
        for _ in range(3):  # a few steps so that SI has a path
            loss = torch.nn.functional.cross_entropy(model(task.x_train), y)
            model.zero_grad()
            loss.backward()
            method.after_backward(model)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            method.after_step(model)
        method.after_task(model, task)
    with torch.no_grad():
        for p in model.parameters():
            p += 0.05 * torch.randn_like(p)
    model.zero_grad()
    reference = method.strength * method.penalty(model)
    reference.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # the fused path must add to what is there
    value = method.add_penalty_grad(model)
    assert value.item() == pytest.approx(reference.item(), rel=1e-10)
    for p, g in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, g + 1, rtol=1e-10, atol=1e-12)
