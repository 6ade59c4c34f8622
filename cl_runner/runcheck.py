"""``cl-run-check method=<m> [model=…] [overrides]``: the method contract (:mod:`cl_runner.contract`) on
any method cl-run can run — a built-in one or the user's, from a config folder of theirs
(``hydra.searchpath``, ``CL_RUNNER_CONFIG_PATH``) or an installed extension.

The command line is read as cl-run reads it (the same group options and checks, the same one-line
errors); the runs are small (:data:`TINY`: 3 tasks of the offline digits, 32 training images per task,
1 epoch, one thread, CPU), each value of which the command line may override. One line per contract,
``ok``, ``FAIL`` with what differed, or ``skip`` with why it does not apply. Exit code 0 when no contract
fails, 1 when one does, 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from cl_runner import contract
from cl_runner.app import EXIT_FAILED, EXIT_USAGE, CommandLine, _compose
from cl_runner.folders import UsageError

#: the contract's runs, unless the command line says otherwise
TINY = contract.TINY

USAGE = """usage: cl-run-check method=<name> [model=<name>] [key=value ...] [-cd DIR] [-cn NAME]

Runs the method contract on small runs (3 tasks of the offline digits, 32 training images per task,
1 epoch, one thread, CPU; any of it can be overridden):
  λ = 0 reproduces finetune (methods with a strength); an importance pass leaves the model as found
  (the same parameter objects, values, buffers, gradients, training flags, global random state; run
  in eval mode); a run interrupted at task 2 and resumed ends with the same matrix and parameters,
  bitwise; a non-finite penalty ends the run as diverged; checkpoints load with weights_only=True.
The method's config is found as cl-run finds it (hydra.searchpath=[file://...], CL_RUNNER_CONFIG_PATH,
installed extensions). Exit code 0: every contract holds; 1: one does not; 2: bad input."""


def _arguments(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cl-run-check", add_help=False)
    p.error = lambda message: (_ for _ in ()).throw(UsageError(message))
    p.add_argument("overrides", nargs="*")
    p.add_argument("-cd", "--config-dir")
    p.add_argument("-cn", "--config-name")
    args = p.parse_args(argv)
    args.multirun = False
    return args


def with_defaults(overrides: list[str]) -> list[str]:
    """:data:`TINY` for every key the command line leaves unset, then the command line (a ``benchmark=``
    choice of its own drops TINY's ``benchmark.*`` values)."""
    try:
        given = {o.key_or_group for o in OverridesParser.create().parse_overrides(overrides)}
    except OverrideParseException as e:
        raise UsageError(" ".join(str(e).split())) from None
    keep = []
    for item in TINY:
        key = item.split("=", 1)[0]
        if key in given or (key.startswith("benchmark.") and "benchmark" in given):
            continue
        keep.append(item)
    return [*keep, *overrides]


def prepare(argv: list[str]) -> tuple[CommandLine, list[str]]:
    """The checked command line and the overrides the contract composes with; UsageError (one line)."""
    from cl_runner.checks import validate
    from cl_runner.data.datasets import DatasetUnavailable

    args = _arguments(argv)
    if not any(o.split("=", 1)[0].lstrip("+") == "method" for o in args.overrides):
        raise UsageError("give the method to check: cl-run-check method=<name> [model=<name>] [overrides]")
    args.overrides = with_defaults(args.overrides)
    line = CommandLine(args)
    if line.sweep:
        raise UsageError("cl-run-check checks one configuration; give one value per key (no a,b sweeps)")
    cfg = line.compose()
    try:
        validate(cfg)
    except (ValueError, DatasetUnavailable) as e:
        raise UsageError(" ".join(str(e).split())) from None
    return line, [o for o in line.representative if not o.startswith("hydra.searchpath=")]


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        line, overrides = prepare(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for warning in line.warnings:
        print(warning, file=sys.stderr)
    searchpath = [o for o in line.representative if o.startswith("hydra.searchpath=")]

    def compose(more: list[str]):
        return _compose([*searchpath, *more], search=line.search)

    print(f"cl-run-check {' '.join(overrides)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cl-run-check-") as folder:
        outcomes = contract.check_method(compose, overrides, Path(folder))
    for outcome in outcomes:
        print(outcome.line())
    return 0 if all(o.ok for o in outcomes) else EXIT_FAILED


def cli() -> None:
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
