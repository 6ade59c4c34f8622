"""The Fisher representations of cl_runner/curvature/ against brute force: per-sample
gradients from a Python loop over samples and classes, their outer products summed; KFAC against
dense where KFAC is exact; quadratic / matvec / solve against the dense matrix and torch.linalg."""

import pytest
import torch
from torch import nn

from cl_runner import curvature
from cl_runner.curvature import fisher_diagonal
from cl_runner.methods.base import named_params


def _mlp(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 7)).double()


def _cnn():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 2), nn.Flatten(), nn.Linear(8, 5, bias=False)
    ).double()


def _brute(model, x, units, labels, y=None, sample_units=None, target=None):
    """F = 1/N Σ_n Σ_c w_nc g g ᵀ by a loop over samples and classes (autograd on one sample)."""
    params = list(named_params(model).values())
    total = None
    model.eval()
    for n in range(len(x)):
        lo, hi = units if sample_units is None else [int(v) for v in sample_units[n]]
        logp = torch.log_softmax(model(x[n : n + 1])[0, lo:hi], 0)
        if labels == "all":
            classes = [(c, logp[c].exp().item()) for c in range(hi - lo)]
        else:
            c = {"true": None if y is None else int(y[n]) - lo, "pred": int(logp.argmax())}.get(labels)
            classes = [(int(target[n]) if c is None else c, 1.0)]
        for c, w in classes:
            g = torch.cat([v.reshape(-1) for v in torch.autograd.grad(logp[c], params, retain_graph=True)])
            term = w * torch.outer(g, g)
            total = term if total is None else total + term
    model.train()
    return total / len(x)


def test_dense_equals_the_brute_force_sum_of_outer_products():
    model = _mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.randint(2, 6, (5,))
    for labels in ("all", "true", "pred"):
        f = curvature.fisher(model, x, (2, 6), kind="dense", labels=labels, y=y)
        assert f.factor is not None  # 5·4 rows < P = 91: the factor form
        torch.testing.assert_close(f.to_dense(), _brute(model, x, (2, 6), labels, y))
    # enough rows for the matrix form, and a CNN (conv, pool, bias-less head)
    cnn = _cnn()
    xc = torch.randn(30, 2, 8, 8, dtype=torch.float64)
    f = curvature.fisher(cnn, xc, (0, 5), kind="dense", labels="all")
    assert f.matrix is not None and f.n_params == 54 + 3 + 24 + 2 + 40  # 30·5 rows > P
    torch.testing.assert_close(f.to_dense(), _brute(cnn, xc, (0, 5), "all"))


def test_sample_units_mask_each_sample_to_its_own_units():
    model = _mlp()
    x = torch.randn(6, 6, dtype=torch.float64)
    su = torch.tensor([[0, 3], [3, 7], [0, 3], [3, 7], [0, 7], [3, 7]])
    y = torch.tensor([1, 4, 0, 6, 5, 3])
    for labels in ("all", "true"):
        want = _brute(model, x, None, labels, y, su)
        dense = curvature.fisher(model, x, (0, 7), kind="dense", labels=labels, y=y, sample_units=su)
        torch.testing.assert_close(dense.to_dense(), want)
        diag = curvature.fisher(model, x, (0, 7), kind="diag", labels=labels, y=y, sample_units=su)
        torch.testing.assert_close(diag.to_dense(), torch.diag(want.diagonal()))


def test_sampled_labels_use_the_generator_not_the_global_rng():
    model = _mlp()
    x = torch.randn(8, 6, dtype=torch.float64)
    rng = torch.get_rng_state()
    a = curvature.fisher(model, x, (0, 7), kind="dense", labels="sample", generator=torch.Generator().manual_seed(3))
    assert torch.equal(rng, torch.get_rng_state())
    b = curvature.fisher(model, x, (0, 7), kind="dense", labels="sample", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.to_dense(), b.to_dense())
    # the same draws by hand
    with torch.no_grad():
        p = torch.softmax(model.eval()(x)[:, 0:7].double(), 1)
    model.train()
    target = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
    torch.testing.assert_close(a.to_dense(), _brute(model, x, (0, 7), "sample", target=target))


def test_diag_is_ewcs_diagonal_and_the_dense_diagonal():
    model = _cnn()
    x = torch.randn(7, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (7,))
    d = curvature.fisher(model, x, (0, 5), kind="diag", labels="all", y=y, chunk=16)
    ref = fisher_diagonal(model, x, y, (0, 5), "all", 16)  # torch.func; here per-sample grads by einsum
    for n in ref:
        torch.testing.assert_close(d.values[n], ref[n])
    dense = curvature.fisher(model, x, (0, 5), kind="dense", labels="all")
    torch.testing.assert_close(d.to_dense().diagonal(), dense.to_dense().diagonal())


def test_kfac_is_exact_for_one_sample_through_one_linear_layer():
    torch.manual_seed(0)
    for bias in (True, False):
        model = nn.Linear(5, 4, bias=bias).double()
        x = torch.randn(1, 5, dtype=torch.float64)
        for labels in ("all", "pred"):
            k = curvature.fisher(model, x, (0, 4), kind="kfac", labels=labels)
            torch.testing.assert_close(k.to_dense(), _brute(model, x, (0, 4), labels))
    # a convolution with one output position (T = 1) is a linear layer on the expanded patch
    conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten()).double()
    xc = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    k = curvature.fisher(conv, xc, (0, 4), kind="kfac", labels="all")
    torch.testing.assert_close(k.to_dense(), _brute(conv, xc, (0, 4), "all"))


def _blocks(model):
    """Index sets of each Linear layer's [weight, bias] in named_params order."""
    out, i = [], 0
    for m in model:
        if isinstance(m, nn.Linear):
            k = m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
            out.append(slice(i, i + k))
            i += k
    return out


def test_kfac_on_a_small_mlp_exact_blocks_for_one_sample_and_close_for_many():
    model = _mlp()
    x1 = torch.randn(1, 6, dtype=torch.float64)
    k, d = (curvature.fisher(model, x1, (0, 7), kind=kind, labels="all").to_dense() for kind in ("kfac", "dense"))
    for b in _blocks(model):  # one sample: every diagonal block is exact, cross-layer blocks are zero
        torch.testing.assert_close(k[b, b], d[b, b])
    assert k[_blocks(model)[0], _blocks(model)[1]].abs().max() == 0
    x = torch.randn(256, 6, dtype=torch.float64)
    k, d = (curvature.fisher(model, x, (0, 7), kind=kind, labels="all").to_dense() for kind in ("kfac", "dense"))
    # measured relative errors per block (first to last layer): 0.48, 0.32, 0.008 — the factorization
    # assumes a and δ independent; the last layer's δ = p-weighted (e_c − p) barely depends on a
    errs = []
    for b in _blocks(model):
        errs.append(float((k[b, b] - d[b, b]).norm() / d[b, b].norm()))
        assert torch.corrcoef(torch.stack([k[b, b].flatten(), d[b, b].flatten()]))[0, 1] > 0.85
    assert max(errs) < 0.6 and errs[-1] < 0.05, errs


def _reps(model, x, y=None):
    return {kind: curvature.fisher(model, x, (0, 7), kind=kind, labels="all", y=y) for kind in curvature.KINDS}


def test_quadratic_matvec_and_penalty_gradient_against_the_dense_matrix():
    model = _mlp()
    x = torch.randn(9, 6, dtype=torch.float64)
    shapes = {n: p.shape for n, p in named_params(model).items()}
    for kind, f in _reps(model, x).items():
        dense = f.to_dense()
        delta = {n: torch.randn(s, dtype=torch.float64, requires_grad=True) for n, s in shapes.items()}
        flat = torch.cat([v.reshape(-1) for v in delta.values()])
        q = f.quadratic(delta)
        torch.testing.assert_close(q, flat @ dense @ flat, msg=kind)
        mv = f.matvec(delta)
        torch.testing.assert_close(torch.cat([v.reshape(-1) for v in mv.values()]), dense @ flat, msg=kind)
        grads = torch.autograd.grad(q, list(delta.values()))  # ∇ δᵀFδ = 2Fδ
        torch.testing.assert_close(torch.cat([g.reshape(-1) for g in grads]), 2 * dense @ flat.detach(), msg=kind)


@pytest.mark.parametrize("n", [3, 40])  # dense: Woodbury (3·7 rows < P) and Cholesky of the matrix
def test_solve_against_torch_linalg_solve(n):
    model = _mlp()
    x = torch.randn(n, 6, dtype=torch.float64)
    shapes = {k: p.shape for k, p in named_params(model).items()}
    g = {k: torch.randn(s, dtype=torch.float64) for k, s in shapes.items()}
    flat = torch.cat([v.reshape(-1) for v in g.values()])
    for kind, f in _reps(model, x).items():
        if kind == "dense":
            assert (f.factor is not None) == (n == 3)
        for damping in (1e-2, 1.0):
            want = torch.linalg.solve(f.to_dense() + damping * torch.eye(len(flat), dtype=flat.dtype), flat)
            got = torch.cat([v.reshape(-1) for v in f.solve(g, damping).values()])
            torch.testing.assert_close(got, want, msg=f"{kind} {damping}")


def test_add_scale_and_state_roundtrip():
    model = _mlp()
    a = _reps(model, torch.randn(3, 6, dtype=torch.float64))
    b = _reps(model, torch.randn(4, 6, dtype=torch.float64))
    for kind in curvature.KINDS:
        want = 0.5 * (a[kind].to_dense() + 0.3 * b[kind].to_dense())
        state = a[kind].state_dict()
        f = curvature.from_state(state).add_(b[kind], 0.3).scale_(0.5)
        torch.testing.assert_close(f.to_dense(), want, msg=kind)
        torch.testing.assert_close(curvature.from_state(f.state_dict()).to_dense(), want, msg=kind)
        d = f.diagonal()
        torch.testing.assert_close(torch.cat([v.reshape(-1) for v in d.values()]), want.diagonal(), msg=kind)


def test_dense_refused_in_one_line_above_the_limit():
    big = nn.Linear(200, 101)  # 20,301 parameters
    with pytest.raises(ValueError) as e:
        curvature.fisher(big, torch.randn(2, 200), (0, 101), kind="dense", labels="pred")
    msg = str(e.value)
    assert "\n" not in msg and "20,301" in msg and "20,000" in msg and "kfac" in msg


def test_a_pass_leaves_the_model_as_found():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5))
    model.append(nn.Linear(3 * 6 * 6, 5))
    model.double().train()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    model(x).sum().backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    objects = list(model.parameters())
    rng = torch.get_rng_state()
    reps = _reps_5(model, x)
    assert list(model.parameters()) == objects and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert torch.equal(rng, torch.get_rng_state())
    # batch norm's affine parameters are the diagonal part of KFAC; in eval mode dropout is off;
    # a parameter outside Linear/Conv2d sends dense and diag through torch.func
    dense = reps["dense"].to_dense()
    torch.testing.assert_close(dense, _brute(model, x, (0, 5), "all"))
    torch.testing.assert_close(reps["kfac"].diagonal()["1.weight"], dense.diagonal()[54 + 3 : 54 + 6])
    torch.testing.assert_close(reps["diag"].to_dense(), torch.diag(dense.diagonal()))


def _reps_5(model, x):
    return {kind: curvature.fisher(model, x, (0, 5), kind=kind, labels="all") for kind in curvature.KINDS}


def test_image_is_a_picture_of_the_matrix():
    model = _mlp()
    f = curvature.fisher(model, torch.randn(3, 6, dtype=torch.float64), (0, 7), kind="kfac", labels="all")
    img = f.image()
    assert img.shape == (f.n_params, f.n_params) and img.min() >= 0 and img.max() == 1
    dense = f.to_dense()
    assert torch.equal(img == 0, dense.abs() <= dense.abs().max() * 1e-6)  # cross-layer blocks are blank
    small = f.image(max_side=40)
    assert max(small.shape) <= 40
