"""Contract over the config tree: every model config × every method config (iterated from
configs/, so a new file is covered without editing this test).

- An importance pass leaves the model as it found it: the very same parameter objects (the ones the
  optimizer holds), the same values, buffers, gradients, training flags and global RNG state.
- λ = 0 reproduces finetune's accuracy matrix exactly, for every method with a strength (the
  methods without one, joint, replay, ng_replay, train on other data and refuse ``lambda``).

EWC and online EWC run once per Fisher representation (``method.fisher``: diag, kfac, dense); dense
on a model above the limit must be refused in one line instead.
"""

from importlib import resources

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from cl_runner import curvature
from cl_runner.data.benchmarks import build_stream
from cl_runner.methods import build_method
from cl_runner.models import build_model
from cl_runner.run import run_experiment
from cl_runner.trainer import Trainer, make_optimizer_factory

CONFIGS = resources.files("cl_runner.configs")
MODELS = sorted(f.name[:-5] for f in (CONFIGS / "model").iterdir() if f.name.endswith(".yaml"))
METHODS = sorted(f.name[:-5] for f in (CONFIGS / "method").iterdir() if f.name.endswith(".yaml"))
# methods with a strength λ (their config's lambda is not null); λ = 0 must make them finetune
WITH_STRENGTH = [m for m in METHODS if OmegaConf.load(str(CONFIGS / "method" / f"{m}.yaml")).get("lambda") is not None]
# a method with extra overrides: "ewc+method.fisher=kfac"
VARIANTS = METHODS + [
    f"{m}+method.fisher={k}" for m in ("ewc", "online_ewc") if m in METHODS for k in ("kfac", "dense")
]
# small and fast, and large enough for every model: 2 tasks of digits padded to 32×32 (the CNNs'
# kernels need more than 8×8), 24 training images per task
SMALL = [
    "benchmark=split_digits",
    "benchmark.n_tasks=2",
    "benchmark.pad=32",
    "benchmark.max_train_per_task=24",
    "benchmark.max_test_per_task=24",
    "epochs=1",
    "batch_size=8",
    "threads=1",
    "scenario=class",
]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _overrides(variant):
    method, *extra = variant.split("+")
    return method, [f"method={method}", *extra]


def _refused_dense(variant, model):
    """A dense Fisher above the limit: the one-line refusal is the expected outcome."""
    return "fisher=dense" in variant and sum(p.numel() for p in model.parameters()) > curvature.DENSE_LIMIT


@pytest.mark.parametrize("method", VARIANTS)
@pytest.mark.parametrize("model_name", MODELS)
def test_importance_pass_leaves_the_model_as_found(model_name, method):
    method, overrides = _overrides(method)
    cfg = compose_config(*SMALL, f"model={model_name}", *overrides)
    torch.manual_seed(0)
    stream = build_stream(cfg.benchmark, cfg.scenario, 0, "cpu", ".")
    model = build_model(cfg.model, stream.input_shape, stream.n_outputs)
    m = build_method(
        method, cfg.method.get("lambda") or 0.0, {k: v for k, v in cfg.method.items() if k not in ("name", "lambda")}
    )
    if _refused_dense(" ".join(overrides), model):
        with pytest.raises(ValueError, match=r"^method.fisher=dense: the model has [\d,]+ trainable parameters, more"):
            m.setup(model, stream, seed=0)
        return
    m.setup(model, stream, seed=0)
    optimizer = make_optimizer_factory(cfg.optimizer)(model)
    model.train()
    loss = model(stream[0].x_train[:8]).sum()
    loss.backward()  # a .grad to keep
    objects = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state, rng = _state(model), torch.get_rng_state()
    for task in stream:
        m.before_task(model, task)
        m.after_task(model, task)
    assert {n: p for n, p in model.named_parameters(remove_duplicate=False)} == objects  # same objects
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    after = _state(model)
    assert all(torch.equal(state[k], after[k]) for k in state), "parameters or buffers changed"
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert model.training and all(mod.training for mod in model.modules())
    assert torch.equal(rng, torch.get_rng_state())


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    """Finetune's result per model, run once for all methods."""
    cache = {}

    def get(model_name):
        if model_name not in cache:
            cfg = compose_config(*SMALL, f"model={model_name}", "method=finetune")
            cache[model_name] = run_experiment(cfg, tmp_path_factory.mktemp(f"finetune-{model_name}"))
        return cache[model_name]

    return get


@pytest.mark.parametrize("method", [m for m in VARIANTS if m.split("+")[0] in WITH_STRENGTH])
@pytest.mark.parametrize("model_name", MODELS)
def test_lambda_zero_is_finetune(tmp_path, finetune_runs, model_name, method):
    method, overrides = _overrides(method)
    reg = compose_config(*SMALL, f"model={model_name}", *overrides, "lambda=0")
    if "method.fisher=dense" in overrides:
        stream = build_stream(reg.benchmark, reg.scenario, 0, "cpu", ".")
        if _refused_dense("fisher=dense", build_model(reg.model, stream.input_shape, stream.n_outputs)):
            with pytest.raises(ValueError, match="method.fisher=dense: the model has"):
                run_experiment(reg, tmp_path / method)
            return
    a = finetune_runs(model_name)
    b = run_experiment(reg, tmp_path / method)
    assert b["lambda"] == 0
    assert a["initial_accuracy"] == b["initial_accuracy"]
    assert a["accuracy_matrix"] == b["accuracy_matrix"]


class _Swapper:
    """A broken method: its importance pass replaces a parameter by a copy."""

    name, strength, uses_strength = "swapper", 0.0, False

    def setup(self, model, stream, seed=0): ...
    def before_task(self, model, task): ...
    def training_data(self, stream, t):
        from cl_runner.methods import Method

        return Method.training_data(self, stream, t)

    def training_batch(self, batch):
        return batch

    def loss(self, batch, logits):
        return None

    def after_backward(self, model, batch=None): ...
    def after_step(self, model, batch=None): ...
    def importance(self):
        return {}

    def after_task(self, model, task):
        model.head.weight = torch.nn.Parameter(model.head.weight.detach().clone())


def test_trainer_refuses_a_method_that_replaces_parameters():
    cfg = compose_config(*SMALL)
    stream = build_stream(cfg.benchmark, cfg.scenario, 0, "cpu", ".")
    model = build_model(cfg.model, stream.input_shape, stream.n_outputs)
    trainer = Trainer(model, _Swapper(), stream, make_optimizer_factory(cfg.optimizer), batch_size=8)
    with pytest.raises(RuntimeError, match="parameters the optimizer does not hold"):
        trainer.run()
