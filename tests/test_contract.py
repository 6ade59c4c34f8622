"""Contract over the config tree: every model config × every method config (iterated from configs/,
so a new file is covered without editing this test). The contracts are written once, in
cl_runner/contract.py; `cl-run-check` runs the same code on a user's method.

- An importance pass leaves the model as it found it: the very same parameter objects (the ones the
  optimizer holds), the same values, buffers, gradients, training flags and global RNG state, and the
  model runs forward in eval mode inside it.
- λ = 0 reproduces finetune's accuracy matrix (and final parameters) exactly, for every method with a
  strength (the methods without one, joint, replay, ng_replay, …, train on other data and refuse
  ``lambda``).
- Every method: a run interrupted at task 2 and resumed ends bitwise like an uninterrupted one; with
  NaN in its checkpointed state a method with a strength diverges; its checkpoints load with
  ``weights_only=True``.
- The contract names the rule a broken method breaks (tests/broken_methods.py).

EWC and online EWC run once per Fisher representation (``method.fisher``: diag, kfac, dense); dense
on a model above the limit must be refused in one line instead.
"""

from importlib import resources

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from cl_runner import contract, curvature
from cl_runner.data.benchmarks import build_stream
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
# small and fast, and large enough for every model: 2 tasks of digits padded to 16×16 (the CNNs'
# kernels need more than 8×8), 16 training and 16 test images per task
SMALL = [
    "benchmark=split_digits",
    "benchmark.n_tasks=2",
    "benchmark.pad=16",
    "benchmark.max_train_per_task=16",
    "benchmark.max_test_per_task=16",
    "epochs=1",
    "batch_size=8",
    "threads=1",
    "scenario=class",
]
# the resume contract interrupts at task 2 of 3 (cl-run-check's own runs, on a small MLP)
THREE = [
    "benchmark=split_digits",
    "benchmark.n_tasks=3",
    "benchmark.max_train_per_task=32",
    "benchmark.max_test_per_task=32",
    "epochs=1",
    "batch_size=8",
    "threads=1",
    "scenario=class",
    "model.hidden=[32]",
]


def _compose(overrides):
    return compose_config(*overrides)


def _overrides(variant):
    method, *extra = variant.split("+")
    return method, [f"method={method}", *extra]


def _refused_dense(variant, cfg):
    """A dense Fisher above the limit: the one-line refusal is the expected outcome."""
    if "fisher=dense" not in variant:
        return False
    stream = build_stream(cfg.benchmark, cfg.scenario, 0, "cpu", ".")
    model = build_model(cfg.model, stream.input_shape, stream.n_outputs)
    return sum(p.numel() for p in model.parameters()) > curvature.DENSE_LIMIT


@pytest.mark.parametrize("method", VARIANTS)
@pytest.mark.parametrize("model_name", MODELS)
def test_importance_pass_leaves_the_model_as_found(model_name, method):
    method, overrides = _overrides(method)
    cfg = compose_config(*SMALL, f"model={model_name}", *overrides)
    if _refused_dense(" ".join(overrides), cfg):
        with pytest.raises(ValueError, match=r"^method.fisher=dense: the model has [\d,]+ trainable parameters, more"):
            contract.importance_pass(cfg)
        return
    outcome = contract.importance_pass(cfg)
    assert outcome.status == "ok", outcome.line()


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    """Finetune's result per model, run once for all methods."""
    cache = {}

    def get(model_name):
        if model_name not in cache:
            cfg = compose_config(*SMALL, f"model={model_name}", "method=finetune")
            cache[model_name] = contract.run(cfg, tmp_path_factory.mktemp(f"finetune-{model_name}"))
        return cache[model_name]

    return get


@pytest.mark.parametrize("method", [m for m in VARIANTS if m.split("+")[0] in WITH_STRENGTH])
@pytest.mark.parametrize("model_name", MODELS)
def test_lambda_zero_is_finetune(tmp_path, finetune_runs, model_name, method):
    method, overrides = _overrides(method)
    if "fisher=dense" in " ".join(overrides):  # composed here only where the refusal may be the outcome
        reg = compose_config(*SMALL, f"model={model_name}", *overrides, "lambda=0")
        if _refused_dense(" ".join(overrides), reg):
            with pytest.raises(ValueError, match="method.fisher=dense: the model has"):
                run_experiment(reg, tmp_path / method)
            return
    given = [*SMALL, f"model={model_name}", *overrides]
    outcome = contract.lambda_zero(_compose, given, tmp_path, finetune=finetune_runs(model_name))
    assert outcome.status == "ok", outcome.line()


@pytest.mark.parametrize("method", METHODS)
def test_resume_divergence_and_checkpoints(tmp_path, method):
    resume, divergence, checkpoints = contract.resume_contracts(compose_config(*THREE, f"method={method}"), tmp_path)
    assert (resume.status, checkpoints.status) == ("ok", "ok"), f"{resume.line()}\n{checkpoints.line()}"
    if method in WITH_STRENGTH and "no floating-point tensor" not in divergence.detail:
        assert divergence.status == "ok", divergence.line()
    else:  # no penalty, or nothing in its state a NaN could go into (LwF keeps only a generator)
        assert divergence.status == "skip", divergence.line()


def test_finetune_passes_every_contract_that_applies(tmp_path):
    outcomes = contract.check_method(_compose, [*THREE, "method=finetune"], tmp_path)
    assert [o.name for o in outcomes] == list(contract.ORDER)
    assert [o.status for o in outcomes] == ["skip", "ok", "ok", "skip", "ok"], [o.line() for o in outcomes]
    assert outcomes[0].line() == "skip λ = 0 reproduces finetune: method finetune has no strength"


# ----------------------------------------------------------------------------- broken methods are named
def _broken(name):
    return compose_config(*THREE, "method=l2", f"method._target_=broken_methods.{name}")


@pytest.mark.parametrize(
    ("broken", "says"),
    [
        (
            "TrainModePass",
            "the model ran forward in train mode inside it (body.0, body.1, body.2); use eval_mode",
        ),
        ("ChangesParameters", "parameters or buffers changed (body.1.weight, body.1.bias, head.weight, head.bias)"),
        ("ResetsTrainingFlags", "training flags changed (head eval → train)"),
        ("UsesGlobalRandom", "global random state changed (torch's global generator)"),
    ],
)
def test_a_broken_importance_pass_is_named(broken, says):
    outcome = contract.importance_pass(_broken(broken))
    assert outcome.status == "FAIL" and says in outcome.detail, outcome.line()
    assert outcome.line().startswith("FAIL importance pass leaves the model as found: ")


def test_state_that_does_not_survive_resume_fails_the_resume_contract(tmp_path):
    resume, _, checkpoints = contract.resume_contracts(_broken("ForgetsOnResume"), tmp_path)
    assert resume.status == "FAIL" and checkpoints.status == "ok"
    assert resume.detail.startswith(("the accuracy matrix differ", "the final parameters differ")), resume.line()
    assert "from the uninterrupted run's" in resume.detail


def test_an_unsafe_checkpoint_fails_the_checkpoint_contract(tmp_path):
    resume, divergence, checkpoints = contract.resume_contracts(_broken("UnsafeState"), tmp_path)
    assert checkpoints.status == "FAIL" and "broken_methods.Note" in checkpoints.detail, checkpoints.line()
    assert resume.status == "FAIL" and "cannot be read safely" in resume.detail, resume.line()
    assert divergence.status == "skip"


def test_a_method_that_hides_non_finite_state_fails_the_divergence_contract(tmp_path):
    resume, divergence, _ = contract.resume_contracts(_broken("HidesNonFinite"), tmp_path)
    assert resume.status == "ok"
    assert divergence.status == "FAIL" and divergence.detail.endswith("the run ended ok"), divergence.line()


def test_a_method_with_another_lambda_zero_fails(tmp_path):
    """λ = 0 that still moves the parameters (ChangesParameters' pass) is not finetune."""
    outcome = contract.lambda_zero(
        _compose, [*THREE, "method=l2", "method._target_=broken_methods.ChangesParameters"], tmp_path
    )
    assert outcome.status == "FAIL" and "differs from finetune's" in outcome.detail, outcome.line()


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

    def task_loss(self, batch, logits):
        from cl_runner.methods import Method

        return Method.task_loss(self, batch, logits)

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
