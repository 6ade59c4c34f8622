"""Ctrl-C and SIGTERM stop a run at once, keep its finished tasks, and are never lost.

While a run trains (:func:`interruptible`), SIGINT raises :class:`KeyboardInterrupt` and SIGTERM
(kill, scancel, preemption) :class:`Interrupted`, as Python does for Ctrl-C, and each signal is also
*recorded*: Python discards an exception raised inside a finalizer, a weakref callback or a
``__del__`` (it prints "Exception ignored in …"), so a signal that lands there would be swallowed and
the run would finish as if nothing had happened. The trainer calls :func:`check` where it reads the
device anyway (every 50 steps, at the end of each task): a recorded signal raises there again.

While a run writes its final results (:func:`deferred`), signals are only recorded: the writes
complete, and the caller says what arrived. SIGTERM is left alone when something else already handles
it (submitit, inside a Slurm job).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_received: list[str] = []  # names of the signals received during the current block


class Interrupted(KeyboardInterrupt):
    """SIGTERM (kill, scancel, preemption) handled like Ctrl-C: stop, keep what is finished."""


def _raise(signum, frame) -> None:
    name = signal.Signals(signum).name
    _received.append(name)
    raise Interrupted(name) if signum == signal.SIGTERM else KeyboardInterrupt(name)


def _record(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


def received() -> str | None:
    """The first signal received in the current block, or None."""
    return _received[0] if _received else None


def check() -> None:
    """Raise the interruption a recorded signal asked for (one that a finalizer may have swallowed)."""
    if _received:
        name = _received[0]
        raise Interrupted(name) if name == "SIGTERM" else KeyboardInterrupt(name)


@contextlib.contextmanager
def _handlers(handler) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    mine = [signal.SIGINT]
    if previous[signal.SIGTERM] in (signal.SIG_DFL, None, _raise, _record):
        mine.append(signal.SIGTERM)
    for s in mine:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in mine:
            signal.signal(s, previous[s])


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT / SIGTERM interrupt the block (and are recorded for :func:`check`)."""
    _received.clear()
    with _handlers(_raise):
        yield


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGINT / SIGTERM are recorded, not raised, until the block ends (:func:`received` says which)."""
    with _handlers(_record):
        yield
