"""The DER table's protocol (Buzzega et al. 2020, Table 2; aimagelab/mammoth at c66408f): the der2020_*
presets compose to mammoth's best_args.py for every method and memory size, a size without best
arguments is refused, R-MNIST's seeded random angles and PIL's nearest-neighbour rotation, mammoth's MLP
initialization, and mammoth's online EWC and SI against literal re-implementations of its code."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, defaults
from omegaconf import OmegaConf
from torch import nn

from cl_runner.build import check_buffer, options
from cl_runner.data.benchmarks import rotation_angles
from cl_runner.data.stream import Task, TaskStream, assign_units
from cl_runner.data.transforms import rotate
from cl_runner.methods import method_from_config
from cl_runner.methods.online_ewc import OnlineEWC
from cl_runner.methods.si import SI
from cl_runner.models.mlp import MLP
from cl_runner.trainer import Trainer, make_optimizer_factory

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("der2020_perm_mnist", "der2020_rot_mnist", "der2020_seq_mnist")
BUFFERS = (200, 500, 5120)

# mammoth c66408f utils/best_args.py, copied by hand, in cl-runner's names: (lr, {option: value}) per method
# without a memory, {buffer: (lr, {option: value})} per memory method. Mammoth's names: sgd = finetune,
# ewc_on = online_ewc (e_lambda = lambda), si (c = lambda), er = replay (minibatch_size = replay_batch),
# gem (gamma = margin), lwf (alpha = lambda, softmax_temp = temperature), icarl; plus the options that make
# lwf and icarl compute what mammoth's lwf.py and icarl.py compute (their configs/method/*.yaml say why).
BEST = {
    "der2020_perm_mnist": {
        "finetune": (0.2, {}),
        "joint": (0.2, {"mode": "all"}),
        "online_ewc": (0.1, {"lambda": 0.7, "gamma": 1.0}),
        "si": (0.1, {"lambda": 0.5, "xi": 1.0}),
        "replay": {b: (0.2, {"replay_batch": 128}) for b in BUFFERS},
        "gem": {b: (0.1, {"margin": 0.5}) for b in BUFFERS},
        "agem": {b: (0.1, {"replay_batch": 128}) for b in BUFFERS},
        "der": {
            200: (0.2, {"replay_batch": 128, "alpha": 1.0}),
            500: (0.2, {"replay_batch": 128, "alpha": 1.0}),
            5120: (0.2, {"replay_batch": 128, "alpha": 0.5}),
        },
        "derpp": {
            200: (0.1, {"replay_batch": 128, "alpha": 1.0, "beta": 1.0}),
            500: (0.2, {"replay_batch": 128, "alpha": 1.0, "beta": 0.5}),
            5120: (0.2, {"replay_batch": 128, "alpha": 0.5, "beta": 1.0}),
        },
    },
    "der2020_rot_mnist": {
        "finetune": (0.2, {}),
        "joint": (0.2, {"mode": "all"}),
        "online_ewc": (0.1, {"lambda": 0.7, "gamma": 1.0}),
        "si": (0.1, {"lambda": 1.0, "xi": 1.0}),
        "replay": {b: (0.2, {"replay_batch": 128}) for b in BUFFERS},
        "gem": {b: (0.01, {"margin": 0.5}) for b in BUFFERS},
        "agem": {
            200: (0.1, {"replay_batch": 128}),
            500: (0.3, {"replay_batch": 128}),
            5120: (0.3, {"replay_batch": 128}),
        },
        "der": {
            200: (0.2, {"replay_batch": 128, "alpha": 1.0}),
            500: (0.2, {"replay_batch": 128, "alpha": 0.5}),
            5120: (0.2, {"replay_batch": 128, "alpha": 0.5}),
        },
        "derpp": {
            200: (0.1, {"replay_batch": 128, "alpha": 1.0, "beta": 0.5}),
            500: (0.2, {"replay_batch": 128, "alpha": 0.5, "beta": 1.0}),
            5120: (0.2, {"replay_batch": 128, "alpha": 0.5, "beta": 0.5}),
        },
    },
    "der2020_seq_mnist": {
        "finetune": (0.03, {}),
        "joint": (0.03, {"mode": "all"}),
        "online_ewc": (0.03, {"lambda": 90, "gamma": 1.0}),
        "si": (0.1, {"lambda": 1.0, "xi": 0.9}),
        "lwf": (
            0.03,
            {
                "lambda": 1,
                "temperature": 2.0,
                "wd_reg": 0.0005,
                "ce_units": "seen",
                "warmup_epochs": 1,
                "warmup_lr": 0.03,
                "warmup_batch": 10,
            },
        ),
        "replay": {
            200: (0.01, {"replay_batch": 10}),
            500: (0.1, {"replay_batch": 10}),
            5120: (0.1, {"replay_batch": 10}),
        },
        "gem": {200: (0.01, {"margin": 1.0}), 500: (0.03, {"margin": 0.5}), 5120: (0.1, {"margin": 1.0})},
        "agem": {b: (0.1, {"replay_batch": 128}) for b in BUFFERS},
        "icarl": {
            b: (0.1, {"wd_reg": 0, "normalize_features": False, "exemplar_inputs": "uint8_truncated"}) for b in BUFFERS
        },
        "der": {
            200: (0.03, {"replay_batch": 10, "alpha": 0.2}),
            500: (0.03, {"replay_batch": 128, "alpha": 1.0}),
            5120: (0.1, {"replay_batch": 128, "alpha": 0.5}),
        },
        "derpp": {
            200: (0.03, {"replay_batch": 128, "alpha": 0.2, "beta": 1.0}),
            500: (0.03, {"replay_batch": 10, "alpha": 1.0, "beta": 0.5}),
            5120: (0.1, {"replay_batch": 64, "alpha": 0.2, "beta": 0.5}),
        },
    },
}
# not in best_args.py at c66408f: ER's values (er_ace; gdumb's outer lr), memory size from `buffer`
BORROWED = {"er_ace": "replay", "gdumb": "replay"}


def protocol_methods(preset: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / "protocol" / preset).glob("*.yaml"))


def has_config(method: str) -> bool:
    return (ROOT / "configs" / "method" / f"{method}.yaml").is_file()


def resolved(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


# ----------------------------------------------------------------------------- presets
def test_every_table_row_has_a_protocol_file():
    for preset, rows in BEST.items():
        assert set(protocol_methods(preset)) == set(rows) | set(BORROWED), preset


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_values_common_to_every_row(preset):
    cfg = resolved(compose_config(f"experiment={preset}", "method=finetune"))
    seq = preset == "der2020_seq_mnist"
    assert (cfg["epochs"], cfg["iterations"], cfg["batch_size"], cfg["reset_optimizer"]) == (
        1,
        None,
        10 if seq else 128,
        False,
    )
    assert cfg["optimizer"] == {
        "name": "sgd",
        "_target_": "torch.optim.SGD",
        "_partial_": True,
        "lr": 0.03 if seq else 0.2,
        "momentum": 0.0,
        "weight_decay": 0.0,
    }
    assert {k: v for k, v in cfg["model"].items() if not k.startswith("_")} == {
        "name": "mlp",
        "hidden": [100, 100],
        "batch_norm": False,
        "dropout": 0.0,
        "init": "xavier",
    }
    b = cfg["benchmark"]
    assert (b["dataset"], b["pad"], b["normalize"], b["max_train_per_task"], b["max_test_per_task"]) == (
        "mnist",
        0,
        None,
        None,
        None,
    )
    if seq:
        assert (cfg["scenario"], cfg["active_units"]) == ("class", "all")
        assert (b["kind"], b["n_tasks"], b["classes_per_task"], b["shuffle_classes"]) == ("split", 5, 2, False)
        assert b["class_order"] == list(range(10))
    elif preset == "der2020_perm_mnist":
        assert cfg["scenario"] == "domain" and (b["kind"], b["n_tasks"], b["permute_first"]) == ("permuted", 20, True)
    else:
        assert cfg["scenario"] == "domain"
        assert (b["kind"], b["angles"], b["n_tasks"], b["angle_range"], b["interpolation"]) == (
            "rotated",
            "random",
            20,
            [0, 180],
            "nearest",
        )


def _cases():
    for preset in PRESETS:
        for method in protocol_methods(preset):
            row = BEST[preset].get(method) or BEST[preset][BORROWED[method]]
            for buffer in BUFFERS if isinstance(row, dict) else (None,):
                yield preset, method, buffer


@pytest.mark.parametrize("preset, method, buffer", list(_cases()))
def test_preset_gives_best_args(preset, method, buffer):
    if not has_config(method):
        pytest.skip(f"configs/method/{method}.yaml is not on this branch")
    overrides = [f"experiment={preset}", f"method={method}"] + ([f"buffer={buffer}"] if buffer else [])
    cfg = compose_config(*overrides)
    check_buffer(cfg)
    row = BEST[preset].get(method)
    lr, want = (row[buffer] if buffer else row) if row is not None else (BEST[preset][BORROWED[method]][buffer][0], {})
    values = resolved(cfg)
    assert values["optimizer"]["lr"] == lr
    got = {**options(cfg.method), "lambda": values["lambda"]}
    for key, value in want.items():
        assert got[key] == value, key
    if buffer:
        assert got["buffer_size"] == buffer
    # the options reach the method's constructor and the optimizer is built
    method_from_config(cfg.method, values["lambda"])
    make_optimizer_factory(cfg.optimizer)(nn.Linear(2, 2))
    if method == "online_ewc":
        assert (got["half"], got["fisher_labels"], got["fisher_weight"], got["gamma_in_penalty"]) == (
            False,
            "true",
            "likelihood",
            False,
        )
        assert got["fisher_samples"] is None and got["fisher"] == "diag"
    if method == "si":
        assert (got["grad"], got["clip_grad_value"]) == ("total", 1.0)


def test_buffer_ignored_by_methods_without_a_memory():
    a = resolved(compose_config("experiment=der2020_seq_mnist", "method=si"))
    b = resolved(compose_config("experiment=der2020_seq_mnist", "method=si", "buffer=500"))
    assert a["method"] == b["method"] and a["optimizer"] == b["optimizer"] and b["buffer"] == 500
    check_buffer(compose_config("experiment=der2020_seq_mnist", "method=si", "buffer=300"))  # no table: ignored


@pytest.mark.parametrize("buffer", ["300", "null", "0", "abc"])
def test_a_buffer_without_best_arguments_is_refused(buffer):
    cfg = compose_config("experiment=der2020_perm_mnist", "method=replay", f"buffer={buffer}")
    with pytest.raises(ValueError) as e:
        check_buffer(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("buffer")
    if buffer in ("300", "null"):
        assert msg.endswith("choose one of: 200, 500, 5120")


def test_command_line_wins_over_the_table():
    cfg = resolved(
        compose_config(
            "experiment=der2020_seq_mnist", "method=replay", "buffer=200", "optimizer.lr=0.5", "method.replay_batch=7"
        )
    )
    assert (cfg["optimizer"]["lr"], cfg["method"]["replay_batch"], cfg["method"]["buffer_size"]) == (0.5, 7, 200)


# ----------------------------------------------------------------------------- R-MNIST
@pytest.mark.parametrize("size", [(8, 8), (7, 7), (6, 9), (28, 28)])
def test_nearest_rotation_is_pils(size):
    """PIL's Image.rotate (and torchvision's rotate on a PIL image, which mammoth called), pixel for pixel."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    rng = np.random.default_rng(sum(size))
    img = rng.integers(1, 256, size=size, dtype=np.uint8)
    angles = [*rng.uniform(0, 180, 12), 30.0, 45.0, 90.0, 135.0, 179.5, 200.0, -33.0]
    x = torch.tensor(img, dtype=torch.float32)[None, None].expand(2, 3, *size)  # every image and channel alike
    for angle in angles:
        want = np.array(Image.fromarray(img, mode="L").rotate(float(angle)))
        assert np.array_equal(want, np.array(TF.rotate(Image.fromarray(img, mode="L"), float(angle))))
        got = rotate(x, angle, "nearest")
        assert torch.equal(got, torch.tensor(want, dtype=torch.float32)[None, None].expand(2, 3, *size)), angle
    assert torch.equal(rotate(x, 0.0, "nearest"), x)
    # the default (bilinear) is another interpolation: it mixes neighbouring pixels
    assert not torch.equal(rotate(x, 33.0), rotate(x, 33.0, "nearest"))
    with pytest.raises(ValueError, match="benchmark.interpolation"):
        rotate(x, 10.0, "bicubic")


def test_random_angles_are_seeded_uniform_draws():
    cfg = {"angles": "random", "n_tasks": 2000, "angle_range": [0, 180]}
    a = rotation_angles(cfg, torch.Generator().manual_seed(0))
    assert a == rotation_angles(cfg, torch.Generator().manual_seed(0))
    assert a != rotation_angles(cfg, torch.Generator().manual_seed(1))
    assert len(a) == 2000 and min(a) >= 0 and max(a) < 180
    assert abs(np.mean(a) - 90) < 3 and abs(np.std(a) - 180 / math.sqrt(12)) < 3  # U[0, 180): mean 90, std 52
    assert rotation_angles({"angles": [0, 20]}, torch.Generator()) == [0.0, 20.0]
    lo = rotation_angles({**cfg, "n_tasks": 50, "angle_range": [10, 11]}, torch.Generator().manual_seed(0))
    assert all(10 <= v < 11 for v in lo)
    from cl_runner.data.benchmarks import benchmark_options

    node = {"kind": "rotated", "dataset": "mnist", **cfg}
    for bad, key in (  # refused where every option is checked, before anything is drawn or read
        ({**node, "n_tasks": None}, "benchmark.n_tasks"),
        ({**node, "n_tasks": 0}, "benchmark.n_tasks"),
        ({**node, "angle_range": [5, 5]}, "benchmark.angle_range"),
        ({**node, "angle_range": [0]}, "benchmark.angle_range"),
        ({**node, "angles": "sometimes"}, "benchmark.angles"),
        ({**node, "angles": [0, "x"]}, "benchmark.angles"),
    ):
        with pytest.raises(ValueError, match=key):
            benchmark_options(bad)


def test_rotated_stream_with_random_angles(tmp_path):
    """The rotated kind on fake MNIST files: one task per seeded angle, rotated as PIL would."""
    from test_vision_data import fake_data_dir

    from cl_runner.data.benchmarks import build_stream

    fake_data_dir(tmp_path)
    cfg = resolved(compose_config("experiment=der2020_rot_mnist", "benchmark.n_tasks=3"))["benchmark"]
    stream = build_stream(cfg, "domain", seed=4, device="cpu", data_dir=str(tmp_path), download=False)
    angles = rotation_angles(cfg, torch.Generator().manual_seed(4))
    assert len(stream) == 3 and [t.name for t in stream] == [f"mnist-rot{a:g}" for a in angles]
    one = {**cfg, "angles": [0], "n_tasks": None}
    base = build_stream(one, "domain", seed=4, device="cpu", data_dir=str(tmp_path), download=False)
    for task, angle in zip(stream, angles, strict=True):
        assert torch.equal(task.x_train, rotate(base[0].x_train, angle, "nearest"))
        assert torch.equal(task.x_test, rotate(base[0].x_test, angle, "nearest"))


# ----------------------------------------------------------------------------- model
def test_mammoth_mlp_initialization():
    """backbone.xavier: Glorot-uniform weights U(±√(6/(fan_in+fan_out))), zero biases, every Linear."""
    torch.manual_seed(0)
    model = MLP((1, 28, 28), 10, hidden=[100, 100], init="xavier")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(100, 784), (100, 100), (10, 100)]
    for m in linears:
        fan_out, fan_in = m.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert torch.count_nonzero(m.bias) == 0
        assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.95 * bound
        assert abs(m.weight.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    torch.manual_seed(0)
    default = MLP((1, 28, 28), 10, hidden=[100, 100])
    assert default.head.bias.abs().sum() > 0 and default.body[1].weight.abs().max() <= 1 / math.sqrt(784)
    with pytest.raises(ValueError, match="model.init"):
        MLP((1, 4, 4), 3, init="he")


# ----------------------------------------------------------------------------- methods vs mammoth's code
SHAPE = (1, 2, 3)


def toy_stream(n_tasks=3, n=24, classes=4, seed=0, scale=3.0) -> TaskStream:
    """Domain-IL, one shared head of ``classes`` units, float64 inputs N(0, scale²)."""
    g = torch.Generator().manual_seed(seed)
    train, own, n_out = assign_units([list(range(classes))] * n_tasks, "domain")
    tasks = []
    for t in range(n_tasks):
        x = scale * torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
        y = torch.randint(0, classes, (n,), generator=g)
        tasks.append(Task(t, f"t{t}", x, y, x[:8], y[:8], list(range(classes)), train[t], own[t]))
    return TaskStream("toy", "domain", tasks, n_out, SHAPE)


def toy_model(classes=4) -> nn.Module:
    torch.manual_seed(3)
    return MLP(SHAPE, classes, hidden=[5, 4]).double()


def batches_of(stream: TaskStream, batch: int, seed: int) -> list[list[torch.Tensor]]:
    """The trainer's batch order (one epoch per task): its seeded generator's permutations, task after task."""
    g = torch.Generator().manual_seed(seed)
    return [list(torch.randperm(len(task.y_train), generator=g).split(batch)) for task in stream]


def run_trainer(method, model, stream, lr, batch, seed=0):
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=lr)  # noqa: E731
    Trainer(model, method, stream, sgd, batch_size=batch, epochs=1, seed=seed).run()
    return model


def params_of(net: nn.Module) -> torch.Tensor:  # mammoth's get_params
    return torch.cat([p.view(-1) for p in net.parameters()])


def grads_of(net: nn.Module) -> torch.Tensor:  # mammoth's get_grads
    return torch.cat([p.grad.view(-1) for p in net.parameters()])


class MammothEwcOn:
    """models/ewc_on.py at c66408f, as written there (its ContinualModel: plain SGD on the net)."""

    def __init__(self, net, lr, e_lambda, gamma, batch_size):
        self.net, self.e_lambda, self.gamma, self.batch_size = net, e_lambda, gamma, batch_size
        self.opt = torch.optim.SGD(net.parameters(), lr=lr)
        self.logsoft = nn.LogSoftmax(dim=1)
        self.checkpoint = None
        self.fish = None

    def penalty(self):
        if self.checkpoint is None:
            return torch.tensor(0.0)
        return (self.fish * ((params_of(self.net) - self.checkpoint) ** 2)).sum()

    def end_task(self, train_loader):
        fish = torch.zeros_like(params_of(self.net))
        for inputs, labels in train_loader:
            for ex, lab in zip(inputs, labels, strict=True):
                self.opt.zero_grad()
                output = self.net(ex.unsqueeze(0))
                loss = -F.nll_loss(self.logsoft(output), lab.unsqueeze(0), reduction="none")
                exp_cond_prob = torch.mean(torch.exp(loss.detach().clone()))
                loss = torch.mean(loss)
                loss.backward()
                fish += exp_cond_prob * grads_of(self.net) ** 2
        fish /= len(train_loader) * self.batch_size
        if self.fish is None:
            self.fish = fish
        else:
            self.fish *= self.gamma
            self.fish += fish
        self.checkpoint = params_of(self.net).data.clone()

    def observe(self, inputs, labels):
        self.opt.zero_grad()
        outputs = self.net(inputs)
        penalty = self.penalty()
        loss = F.cross_entropy(outputs, labels) + self.e_lambda * penalty
        loss.backward()
        self.opt.step()


class MammothSI:
    """models/si.py at c66408f, as written there."""

    def __init__(self, net, lr, c, xi):
        self.net, self.lr, self.c, self.xi = net, lr, c, xi
        self.opt = torch.optim.SGD(net.parameters(), lr=lr)
        self.checkpoint = params_of(net).data.clone()
        self.big_omega = None
        self.small_omega = 0
        self.clipped = 0  # how many gradient entries clip_grad_value_ changed (for the test)

    def penalty(self):
        if self.big_omega is None:
            return torch.tensor(0.0)
        return (self.big_omega * ((params_of(self.net) - self.checkpoint) ** 2)).sum()

    def end_task(self):
        if self.big_omega is None:
            self.big_omega = torch.zeros_like(params_of(self.net))
        self.big_omega += self.small_omega / ((params_of(self.net).data - self.checkpoint) ** 2 + self.xi)
        self.checkpoint = params_of(self.net).data.clone()
        self.small_omega = 0

    def observe(self, inputs, labels):
        self.opt.zero_grad()
        outputs = self.net(inputs)
        penalty = self.penalty()
        loss = F.cross_entropy(outputs, labels) + self.c * penalty
        loss.backward()
        self.clipped += int((grads_of(self.net).abs() > 1).sum())
        nn.utils.clip_grad.clip_grad_value_(self.net.parameters(), 1)
        self.opt.step()
        self.small_omega += self.lr * grads_of(self.net).data ** 2


def test_online_ewc_fisher_is_mammoths():
    stream, model = toy_stream(n=24), toy_model()
    task = stream[0]
    loader = [(task.x_train[i : i + 8], task.y_train[i : i + 8]) for i in range(0, 24, 8)]  # 24 = 3 × 8 samples
    mammoth = MammothEwcOn(copy.deepcopy(model), 0.1, 1.0, 1.0, batch_size=8)
    mammoth.end_task(loader)
    ours = OnlineEWC(1.0, **defaults("online_ewc", fisher_labels="true", fisher_weight="likelihood", half=False))
    ours.setup(model, stream, seed=0)
    fisher = ours.fisher(model, task)
    torch.testing.assert_close(params_of_dict(model, fisher), mammoth.fish, rtol=1e-10, atol=1e-14)
    # not the empirical Fisher (weight 1), not the exact one
    for labels in ("true", "all"):
        plain = OnlineEWC(1.0, **defaults("online_ewc", fisher_labels=labels))
        plain.setup(model, stream, seed=0)
        assert not torch.allclose(params_of_dict(model, plain.fisher(model, task)), mammoth.fish, rtol=1e-3)


def params_of_dict(model: nn.Module, values: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([values[n].reshape(-1) for n, _ in model.named_parameters()])


def test_online_ewc_run_is_mammoths():
    """Three tasks trained by the trainer with the preset's options = mammoth's EwcOn on the same batches."""
    stream, model, lr, batch, lam = toy_stream(n=24), toy_model(), 0.1, 8, 5.0
    mammoth = MammothEwcOn(copy.deepcopy(model), lr, lam, 1.0, batch_size=batch)
    for task, order in zip(stream, batches_of(stream, batch, seed=0), strict=True):
        for idx in order:
            mammoth.observe(task.x_train[idx], task.y_train[idx])
        mammoth.end_task([(task.x_train[i], task.y_train[i]) for i in order])
    opts = dict(fisher_labels="true", fisher_weight="likelihood", half=False, gamma=1.0, gamma_in_penalty=False)
    ours = run_trainer(OnlineEWC(lam, **defaults("online_ewc", **opts)), model, stream, lr, batch)
    torch.testing.assert_close(params_of(ours), params_of(mammoth.net), rtol=1e-9, atol=1e-12)
    # with ½ (the option's default) the runs differ: the comparison sees the penalty
    half = run_trainer(
        OnlineEWC(lam, **defaults("online_ewc", **{**opts, "half": True})), toy_model(), stream, lr, batch
    )
    assert not torch.allclose(params_of(half), params_of(mammoth.net), rtol=1e-6)


@pytest.mark.parametrize("clip", [1.0, None])
def test_si_run_is_mammoths(clip):
    """Three tasks by the trainer with SI(grad=total, clip_grad_value=1) = mammoth's SI on the same
    batches: parameters after the last task and Ω after the second (the last one the trainer computes)."""
    stream, model, lr, batch, c, xi = toy_stream(n=24, scale=30.0), toy_model(), 0.05, 8, 2.0, 0.9
    mammoth = MammothSI(copy.deepcopy(model), lr, c, xi)
    omega = None
    for t, (task, order) in enumerate(zip(stream, batches_of(stream, batch, seed=0), strict=True)):
        for idx in order:
            mammoth.observe(task.x_train[idx], task.y_train[idx])
        mammoth.end_task()
        if t == 1:
            omega = mammoth.big_omega.clone()
    assert mammoth.clipped > 0  # the clipping is exercised
    si = SI(c, **defaults("si", xi=xi, grad="total", clip_grad_value=clip))
    ours = run_trainer(si, model, stream, lr, batch)
    same = torch.allclose(params_of(ours), params_of(mammoth.net), rtol=1e-9, atol=1e-12)
    if clip is None:  # without the clipping, another run
        assert not same
        return
    assert same
    torch.testing.assert_close(params_of_dict(model, si.importance()), omega, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="method.clip_grad_value"):
        SI(1.0, **defaults("si", clip_grad_value=0))


def test_online_ewc_likelihood_weight_needs_a_diagonal_per_sample_fisher():
    for bad, key in (
        ({"fisher_labels": "all"}, "fisher_labels=all"),
        ({"fisher": "kfac"}, "fisher_weight=likelihood"),
        ({"fisher_weight": "sometimes"}, "method.fisher_weight"),
    ):
        with pytest.raises(ValueError, match=key):
            OnlineEWC(1.0, **defaults("online_ewc", **{"fisher_weight": "likelihood", **bad}))


# ----------------------------------------------------------------------------- scripts/reproduce.py
def load_reproduce():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reproduce_makes_one_row_per_buffer_for_memory_methods():
    rep = load_reproduce()
    assert rep.expand("der2020_seq_mnist", "replay", ["method=replay"], [200, 5120], []) == [
        ("replay@200", ["method=replay", "buffer=200"]),
        ("replay@5120", ["method=replay", "buffer=5120"]),
    ]
    assert rep.expand("der2020_seq_mnist", "si", ["method=si"], [200, 5120], []) == [("si", ["method=si"])]
    # presets without tables, and an explicit buffer= after `--`, leave the entry as it is
    assert rep.expand("hsu2018_split_mnist_domain", "replay", ["method=replay"], [200], []) == [
        ("replay", ["method=replay"])
    ]
    assert rep.expand("der2020_seq_mnist", "replay", ["method=replay"], [], ["buffer=500"]) == [
        ("replay", ["method=replay"])
    ]
    with pytest.raises(ValueError, match="--buffers"):
        rep.expand("der2020_seq_mnist", "replay", ["method=replay"], [], [])
    with pytest.raises(ValueError, match="--buffers 300"):
        rep.expand("der2020_seq_mnist", "replay", ["method=replay"], [200, 300], [])


@pytest.mark.slow
def test_reproduce_runs_the_der_table_with_buffers(tmp_path):
    """`reproduce.py der2020_seq_mnist --methods finetune replay --buffers 200 500` on tiny fake MNIST files."""
    import csv
    import json
    import os
    import subprocess
    import sys

    from test_presets import SHORT
    from test_vision_data import fake_data_dir

    fake_data_dir(tmp_path / "data")
    out = tmp_path / "rep"
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "der2020_seq_mnist", "--methods", "finetune"]
    cmd += ["replay", "--buffers", "200", "500", "--seeds", "0", "--out", str(out), "--"]
    cmd += [f"data_dir={tmp_path / 'data'}", *SHORT]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"finetune", "replay@200", "replay@500"} and all(r["n_ok"] == "1" for r in rows.values())
    for label, size in (("replay@200", 200), ("replay@500", 500)):
        (job,) = [json.loads(p.read_text()) for p in (out / "der2020_seq_mnist" / label).rglob("metrics.json")]
        assert job["method_options"]["buffer_size"] == size and job["method"] == "replay"
    assert "| replay@500 |" in proc.stdout
