"""Fault injection, for tests: make a run fail, diverge or be signalled at a named point of its
phases, so that every outcome can be checked at a controlled moment instead of by racing a timer.

``CL_RUNNER_FAULT="<point>[@<n>][#<k>]:<action>[,…]"`` (read at each point; unset in normal use):

- points: ``setup`` (after the stream, model and method are built), ``train`` (start of task n's
  training, n = 1, 2, …), ``importance`` (task n's importance pass), ``evaluate`` (the evaluation after
  task n), ``checkpoint`` (before task n's checkpoint is written), ``record`` (before the final
  ``metrics.json`` is written), ``written`` (after it);
- actions: ``raise`` (a RuntimeError), ``enospc`` (an OSError: no space left on device),
  ``nonfinite`` (a RuntimeError such as torch raises on NaN input: "probability tensor contains
  either inf, nan or element < 0"), ``sigint``, ``sigterm`` (the signal, sent to this process),
  ``kill`` (SIGKILL: no handler runs).

A point without ``@n`` fires every time it is reached; with ``#k`` only the k-th time it is reached
in this process (the second job of a sweep: ``train@2#2``). The cost in a normal run is one environment
lookup per phase (a few per task), none per step.
"""

from __future__ import annotations

import os
import signal

ENV = "CL_RUNNER_FAULT"
POINTS = ("setup", "train", "importance", "evaluate", "checkpoint", "record", "written")
ACTIONS = ("raise", "enospc", "nonfinite", "sigint", "sigterm", "kill")


class InjectedFault(RuntimeError):
    pass


_reached: dict[str, int] = {}  # how often each planned point was reached in this process


def point(name: str, n: int | None = None) -> None:
    """Fire the action planned for this point (task number ``n``, 1-based), if any."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        where, _, action = item.strip().partition(":")
        place, _, nth = where.partition("#")
        at, _, index = place.partition("@")
        if at != name or (index and (n is None or int(index) != n)):
            continue
        _reached[where] = _reached.get(where, 0) + 1
        if nth and _reached[where] != int(nth):
            continue
        if action == "raise":
            raise InjectedFault(f"injected fault at {where}")
        if action == "enospc":
            raise OSError(28, f"No space left on device (injected at {where})")
        if action == "nonfinite":
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        sig = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "kill": signal.SIGKILL}.get(action)
        if sig is None:
            raise ValueError(f"{ENV}: unknown action {action!r}; choose one of: {', '.join(ACTIONS)}")
        os.kill(os.getpid(), sig)
