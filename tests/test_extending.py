"""Your own method, model and configs without forking cl-runner (issue 22; README "Extending cl-runner"):

- a config folder outside the package, given by ``hydra.searchpath`` (command line, ``pkg://``, a
  primary config of the user's) or ``CL_RUNNER_CONFIG_PATH``: its options join the groups, appear in
  ``--help``, train, and get cl-run's one-line errors; a user's option shadowing a built-in one is one
  warning line;
- an installed extension (examples/cl_runner_example, installed next to cl-runner as a user would):
  found through its entry point alone; ``cl-run-check`` passes on its method and names the contract a
  deliberately broken copy breaks; the example's own tests pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CL_RUN, ROOT

from cl_runner.configpath import ENV

EXAMPLE = ROOT / "examples" / "cl_runner_example"
CL_RUN_CHECK = [sys.executable, "-c", "from cl_runner.runcheck import cli; cli()"]
TINY = [
    "benchmark.max_train_per_task=24",
    "benchmark.max_test_per_task=24",
    "epochs=1",
    "batch_size=8",
    "threads=1",
    "device=cpu",
]

METHOD = '''
"""Decay: λ · scale · Σ θ² (the user's method, in a folder of theirs)."""
from cl_runner.methods import Method


class Decay(Method):
    name = "decay"
    uses_strength = True

    def __init__(self, strength, scale):
        super().__init__(strength)
        self.scale = float(scale)

    def penalty(self, model):
        return self.scale * sum(p.square().sum() for p in model.parameters())
'''

MODEL = '''
"""A one-hidden-layer net (the user's model)."""
import math

from torch import nn


class TinyNet(nn.Module):
    def __init__(self, input_shape, n_outputs, width):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU())
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x):
        return self.head(self.body(x))
'''

CONFIGS = {
    "method/decay.yaml": "name: decay\n_target_: my_methods.Decay\n_partial_: true\nlambda: 0.01\nscale: 1.0\n",
    "method/broken_import.yaml": "name: broken_import\n_target_: my_broken.Thing\n_partial_: true\nlambda: null\n",
    "model/tinynet.yaml": "name: tinynet\n_target_: my_nets.TinyNet\n_partial_: true\nwidth: 16\n",
    "optimizer/mysgd.yaml": "name: mysgd\n_target_: torch.optim.SGD\n_partial_: true\nlr: 0.01\n",
    # a benchmark of the user's from a built-in kind: the digits as odd/even-free pairs, 2 tasks
    "benchmark/digits_pairs.yaml": (
        "name: digits_pairs\nscenarios: [task, domain, class]\nkind: split\ndataset: digits\nn_tasks: 2\n"
        "classes_per_task: 2\nclass_order: [3, 8, 1, 7]\nshuffle_classes: false\npad: 0\nnormalize: null\n"
        "max_train_per_task: null\nmax_test_per_task: null\n"
    ),
    # a preset of the user's, choosing the three above
    "experiment/mine.yaml": (
        "# @package _global_\ndefaults:\n  - override /method: decay\n  - override /model: tinynet\n"
        "  - override /benchmark: digits_pairs\nscenario: task\nmethod:\n  scale: 2.0\n"
    ),
}


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A user's code folder (on sys.path) and config folder, outside any package; ``env``: the
    environment of a subprocess that sees the code."""
    code, configs = tmp_path / "code", tmp_path / "my_configs"
    code.mkdir()
    (code / "my_methods.py").write_text(METHOD)
    (code / "my_nets.py").write_text(MODEL)
    (code / "my_broken.py").write_text("import not_installed_anywhere_xyz\n")
    for name, text in CONFIGS.items():
        (configs / name).parent.mkdir(parents=True, exist_ok=True)
        (configs / name).write_text(text)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delenv(ENV, raising=False)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    yield code, configs, env
    for module in ("my_methods", "my_nets", "my_broken", "my_config_package"):
        sys.modules.pop(module, None)


def _run(args, env, cwd, cmd=CL_RUN, timeout=300):
    return subprocess.run(
        [*cmd, *args], env={**env, "COLUMNS": "200"}, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _listed(line: str) -> set[str]:
    """The options an ``error: … choose one of: a, b, c`` line lists."""
    return set(line.strip().split("choose one of: ", 1)[1].split(", "))


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _main(monkeypatch, capsys, *args):
    """cl-run's main() in this process: (exit code, stdout, stderr)."""
    from cl_runner.app import main

    monkeypatch.setattr("sys.argv", ["cl-run", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- a folder of the user's
def test_a_searchpath_folder_trains_its_method_model_and_benchmark(user, tmp_path):
    code, configs, env = user
    out = tmp_path / "run"
    args = ["method=decay", "model=tinynet", "benchmark=digits_pairs", f"hydra.searchpath=[file://{configs}]", *TINY]
    proc = _run([*args, "method.scale=2", f"hydra.run.dir={out}"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = _metrics(out)
    assert (m["status"], m["method"], m["model"], m["benchmark"]) == ("ok", "decay", "tinynet", "digits_pairs")
    assert m["lambda"] == 0.01 and m["method_options"] == {"scale": 2.0}
    assert len(m["accuracy_matrix"]) == 2 and "warning" not in proc.stderr


def test_an_environment_folder_trains_a_preset_of_the_users(user, tmp_path):
    code, configs, env = user
    out = tmp_path / "run"
    other = tmp_path / "another_folder"  # a `:`-separated list: each folder's options join
    other.mkdir()
    proc = _run(["experiment=mine", *TINY, f"hydra.run.dir={out}"], {**env, ENV: f"{other}:{configs}"}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = _metrics(out)
    assert (m["method"], m["model"], m["benchmark"], m["scenario"]) == ("decay", "tinynet", "digits_pairs", "task")
    assert m["experiment"] == "mine" and m["method_options"] == {"scale": 2.0}


def test_a_sweep_over_the_users_method_and_a_built_in_one(user, tmp_path):
    code, configs, env = user
    sweep = tmp_path / "sweep"
    args = ["-m", "method=decay,l2", "benchmark=split_digits", "benchmark.n_tasks=2", *TINY]
    proc = _run([*args, f"hydra.searchpath=[file://{configs}]", f"hydra.sweep.dir={sweep}"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = sorted(sweep.glob("*/metrics.json"))
    found = {json.loads(p.read_text())["method"]: json.loads(p.read_text())["status"] for p in jobs}
    assert found == {"decay": "ok", "l2": "ok"}
    assert "decay" in (sweep / "summary.md").read_text()


def test_a_primary_config_of_the_users_with_its_searchpath(user, tmp_path, monkeypatch, capsys):
    code, configs, env = user
    primary = tmp_path / "primary"
    primary.mkdir()
    (primary / "mine_main.yaml").write_text(
        f"defaults:\n  - config\n  - _self_\nhydra:\n  searchpath:\n    - file://{configs}\nepochs: 2\n"
    )
    ok, out, err = _main(monkeypatch, capsys, "-cd", str(primary), "-cn", "mine_main", "method=decay", "--cfg", "job")
    assert ok == 0, err
    assert "epochs: 2\n" in out and "_target_: my_methods.Decay" in out
    bad, _, err = _main(monkeypatch, capsys, "-cd", str(primary), "-cn", "mine_main", "method=nope")
    assert bad == 2 and {"broken_import", "decay", "ewc"} <= _listed(err)


def test_a_pkg_searchpath(user, tmp_path, monkeypatch, capsys):
    code, configs, env = user
    package = code / "my_config_package"
    (package / "method").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "method" / "decay2.yaml").write_text(CONFIGS["method/decay.yaml"].replace("decay\n", "decay2\n", 1))
    ok, out, err = _main(
        monkeypatch, capsys, "method=decay2", "hydra.searchpath=[pkg://my_config_package]", "--cfg", "job"
    )
    assert ok == 0, err
    assert "name: decay2" in out
    bad, _, err = _main(monkeypatch, capsys, "method=decay2", "hydra.searchpath=[pkg://no_such_package_xyz]")
    assert bad == 2
    why = "cannot be imported (no module named 'no_such_package_xyz')"
    assert err.strip() == f"error: hydra.searchpath: pkg://no_such_package_xyz {why}"


def test_the_users_options_are_in_help(user, tmp_path, monkeypatch, capsys):
    code, configs, env = user
    for args in ([f"hydra.searchpath=[file://{configs}]"], []):
        if not args:
            monkeypatch.setenv(ENV, str(configs))
        ok, out, _ = _main(monkeypatch, capsys, "--help", *args)
        assert ok == 0
        groups = {line.split(":")[0]: line for line in out.splitlines() if ": " in line and not line.startswith(" ")}
        assert "decay" in groups["method"].split(": ")[1].split(", ")
        assert "tinynet" in groups["model"] and "digits_pairs" in groups["benchmark"] and "mine" in groups["experiment"]


BAD = [
    (
        ["optimizer=mysgd", "+optimizer.momentun=0.9"],
        "error: optimizer mysgd has no option momentun; valid options: dampening, differentiable,",
    ),
    (["method=decay", "+method.scal=1"], "error: method decay has no option scal; valid options: scale"),
    (["model=tinynet", "+model.widht=3"], "error: model tinynet has no option widht; valid options: width"),
    (
        ["method=decay", "method._target_=my_missing_module.Decay"],
        "error: method._target_=my_missing_module.Decay: no module named my_missing_module (is its folder on "
        "PYTHONPATH, or its package installed?)",
    ),
    (
        ["method=broken_import"],
        "error: method._target_=my_broken.Thing: importing module my_broken failed: ModuleNotFoundError: No module "
        "named 'not_installed_anywhere_xyz'",
    ),
    (
        ["method=decay", "method._target_=my_methods.Decai"],
        "error: method._target_=my_methods.Decai: module my_methods has no Decai",
    ),
    (["method=nope"], "error: method=nope is not a known method; choose one of: "),
    (["model=nope"], "error: model=nope is not a known model; choose one of: "),
]


@pytest.mark.parametrize("how", ["searchpath", "environment"])
@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_the_users_configs_get_the_same_one_line_errors(user, tmp_path, monkeypatch, capsys, how, args, message):
    code, configs, env = user
    where = [f"hydra.searchpath=[file://{configs}]"] if how == "searchpath" else []
    if how == "environment":
        monkeypatch.setenv(ENV, str(configs))
    run_dir = tmp_path / "run"
    exit_code, out, err = _main(monkeypatch, capsys, *args, *where, f"hydra.run.dir={run_dir}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_code == 2 and len(lines) == 1 and "Traceback" not in out + err, err
    assert lines[0].startswith(message) or message in lines[0], lines[0]
    joined = {"method=nope": {"decay", "broken_import", "ewc", "finetune"}, "model=nope": {"tinynet", "mlp", "cnn"}}
    assert joined.get(args[0], set()) <= _listed(lines[0]) if "choose one of" in lines[0] else True
    assert not run_dir.exists()


def test_a_folder_that_does_not_exist_is_one_line(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing"
    code, _, err = _main(monkeypatch, capsys, f"hydra.searchpath=[file://{missing}]")
    assert code == 2 and err.strip() == f"error: hydra.searchpath: {missing} is not a folder"
    monkeypatch.setenv(ENV, f"{tmp_path}:{missing}")
    code, _, err = _main(monkeypatch, capsys)
    assert code == 2 and err.strip() == f"error: {ENV}: {missing} is not a folder"
    monkeypatch.delenv(ENV)
    code, _, err = _main(monkeypatch, capsys, f"hydra.searchpath=file://{tmp_path}")
    assert code == 2 and err.strip() == f"error: hydra.searchpath must be a list of strings. Got: file://{tmp_path}"


def test_shadowing_a_built_in_option_is_one_warning(user, tmp_path, monkeypatch, capsys):
    """A user's method/ewc.yaml in CL_RUNNER_CONFIG_PATH replaces cl-runner's (one warning line, once,
    the run uses the user's values); from hydra.searchpath (after cl-runner's) it is not used, and
    the warning says so."""
    code, configs, env = user
    ewc = (ROOT / "configs" / "method" / "ewc.yaml").read_text().replace("\nlambda: 1000", "\nlambda: 5")
    assert "\nlambda: 5" in ewc
    (configs / "method" / "ewc.yaml").write_text(ewc)
    out = tmp_path / "run"
    proc = _run(
        ["method=ewc", "benchmark=split_digits", "benchmark.n_tasks=2", *TINY, f"hydra.run.dir={out}"],
        {**env, ENV: str(configs)},
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning:") == 1, proc.stderr
    assert f"warning: method=ewc from {configs} shadows cl-runner's own\n" in proc.stderr
    assert _metrics(out)["lambda"] == 5.0  # the user's default strength
    code_, _, err = _main(monkeypatch, capsys, "method=ewc", f"hydra.searchpath=[file://{configs}]", "--cfg", "job")
    assert code_ == 0 and err.count("warning:") == 1
    assert err.startswith(f"warning: method=ewc from {configs} is not used: cl-runner's own comes first")


# ----------------------------------------------------------------------------- an installed extension
@pytest.fixture(scope="module")
def example_env(tmp_path_factory):
    """examples/cl_runner_example installed next to cl-runner (its own folder on PYTHONPATH, as
    `pip install --target` + PYTHONPATH, no editable link to the source), and nothing else set."""
    where = tmp_path_factory.mktemp("example")
    source, site = where / "source", where / "site"  # built from a copy: no build/ or egg-info in the tree
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(source)],
        check=True,
        capture_output=True,
    )
    assert (site / "cl_example" / "configs" / "method" / "sqgrad.yaml").is_file()
    env = {k: v for k, v in os.environ.items() if k != ENV}
    return {**env, "PYTHONPATH": os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


@pytest.mark.slow
@pytest.mark.xdist_group("example")  # one worker installs the example once
def test_an_installed_extension_is_found_by_its_entry_point(example_env, tmp_path):
    helped = _run(["--help"], example_env, tmp_path)
    assert "sqgrad" in helped.stdout and "resmlp" in helped.stdout
    out = tmp_path / "run"
    proc = _run(
        ["method=sqgrad", "model=resmlp", "benchmark=split_digits", *TINY, f"hydra.run.dir={out}"],
        example_env,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    m = _metrics(out)
    assert (m["status"], m["method"], m["model"], m["lambda"]) == ("ok", "sqgrad", "resmlp", 100.0)
    assert m["method_options"] == {"samples": 256, "batch": 32, "decay": 1.0}


@pytest.mark.slow
@pytest.mark.xdist_group("example")  # one worker installs the example once
def test_cl_run_check_passes_on_the_example(example_env, tmp_path):
    proc = _run(["method=sqgrad", "model=resmlp"], example_env, tmp_path, cmd=CL_RUN_CHECK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["ok"] * 5, proc.stdout


SQGRAD = (EXAMPLE / "cl_example" / "sqgrad.py").read_text()
# deliberately broken copies of the example's method: (what is replaced, by what, the contracts that must fail)
BROKEN = {
    "train_mode": (
        "with eval_mode(model):",
        "with contextlib.nullcontext(model):",
        {"importance pass leaves the model as found"},
    ),
    "moves_parameters": (
        "        self.anchor = {k: p.detach().clone() for k, p in params.items()}\n",
        "        self.anchor = {k: p.detach().clone() for k, p in params.items()}\n"
        "        with torch.no_grad():\n            for p in params.values():\n                p.mul_(0.99)\n",
        {"importance pass leaves the model as found", "λ = 0 reproduces finetune"},
    ),
    "forgets_on_resume": (
        "    def importance(self)",
        "    def state_dict(self):\n        return {}\n\n    def importance(self)",
        {"resume after an interruption gives the same matrix"},
    ),
}


@pytest.mark.slow
@pytest.mark.xdist_group("example")  # one worker installs the example once
@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_cl_run_check_names_the_broken_contract(example_env, tmp_path, broken):
    old, new, failing = BROKEN[broken]
    assert old in SQGRAD
    code, configs = tmp_path / "code", tmp_path / "configs" / "method"
    code.mkdir()
    configs.mkdir(parents=True)
    (code / f"sqgrad_{broken}.py").write_text(
        SQGRAD.replace(old, new).replace("import math\n", "import contextlib\nimport math\n")
    )
    config = (EXAMPLE / "cl_example" / "configs" / "method" / "sqgrad.yaml").read_text()
    (configs / f"{broken}.yaml").write_text(
        config.replace("cl_example.sqgrad.SquaredGradient", f"sqgrad_{broken}.SquaredGradient").replace(
            "name: sqgrad", f"name: {broken}"
        )
    )
    env = {**example_env, "PYTHONPATH": f"{code}{os.pathsep}{example_env['PYTHONPATH']}", ENV: str(configs.parent)}
    proc = _run([f"method={broken}", "model=resmlp"], env, tmp_path, cmd=CL_RUN_CHECK)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()[1:]
    failed = {line[5:].split(":")[0] for line in lines if line.startswith("FAIL ")}
    assert failed == failing, proc.stdout


@pytest.mark.slow
@pytest.mark.xdist_group("example")  # one worker installs the example once
def test_the_examples_own_tests_pass(example_env, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(EXAMPLE / "pyproject.toml"),
            str(EXAMPLE / "tests"),
        ],
        env=example_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_cl_run_check_refuses_bad_input_in_one_line(capsys):
    from cl_runner.runcheck import main

    for args, message in [
        ([], "error: give the method to check: cl-run-check method=<name>"),
        (["method=nope"], "error: method=nope is not a known method; choose one of:"),
        (["method=ewc", "lambda=-1"], "error: lambda must be >= 0, got -1"),
        (["method=ewc,si"], "error: cl-run-check checks one configuration"),
        (["method=ewc", "+method.fishr=kfac"], "error: method ewc has no option fishr; valid options: fisher,"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
