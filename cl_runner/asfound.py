"""What an importance pass must leave as it found it (the method contract, :mod:`cl_runner.contract`):
a :class:`Snapshot` of a model before the pass, :func:`compare` after it (the same parameter objects,
held by the optimizer, the same values, buffers, gradients, training flags and global random state),
and :func:`forwards_in_train_mode`, the modules that ran forward in train mode during it."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def names(items: Sequence[str], n: int = 4) -> str:
    """The first ``n`` of ``items``, comma-separated, and how many more."""
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _rng() -> tuple[Any, ...]:
    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _same_rng(a: tuple[Any, ...], b: tuple[Any, ...]) -> list[str]:
    import numpy as np

    changed = []
    if not torch.equal(a[0], b[0]):
        changed.append("torch's global generator")
    if len(a[1]) != len(b[1]) or not all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=False)):
        changed.append("the CUDA generators")
    if a[2] != b[2]:
        changed.append("Python's random")
    if not (a[3][0] == b[3][0] and np.array_equal(a[3][1], b[3][1]) and a[3][2:] == b[3][2:]):
        changed.append("NumPy's global generator")
    return changed


@dataclass
class Snapshot:
    objects: dict[str, Any]
    values: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor | None]
    modes: dict[str, bool]
    rng: tuple[Any, ...]

    @classmethod
    def of(cls, model: torch.nn.Module) -> Snapshot:
        return cls(
            objects=dict(model.named_parameters(remove_duplicate=False)),
            values={k: v.detach().clone() for k, v in model.state_dict().items()},
            grads={n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            modes={n or "(the model)": m.training for n, m in model.named_modules()},
            rng=_rng(),
        )


def compare(before: Snapshot, model: torch.nn.Module, optimizer: Any) -> list[str]:
    """What an importance pass changed (empty: nothing)."""
    after = Snapshot.of(model)
    found = []
    swapped = [n for n, p in before.objects.items() if after.objects.get(n) is not p]
    if swapped or not all(isinstance(p, torch.nn.Parameter) for p in model.parameters()):
        found.append(f"parameter objects replaced ({names(swapped) or 'by plain tensors'})")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if held != {id(p) for p in model.parameters()}:
        found.append("the optimizer no longer holds the model's parameters")
    values = [k for k, v in before.values.items() if k not in after.values or not torch.equal(v, after.values[k])]
    if values:
        found.append(f"parameters or buffers changed ({names(values)})")
    grads = [n for n, g in before.grads.items() if not _same_grad(g, after.grads.get(n))]
    if grads:
        found.append(f"gradients changed ({names(grads)})")
    modes = [
        f"{n} {'train' if m else 'eval'} → {'train' if after.modes.get(n) else 'eval'}"
        for n, m in before.modes.items()
        if after.modes.get(n) != m
    ]
    if modes:
        found.append(f"training flags changed ({names(modes)}); restore each module's own flag (eval_mode)")
    rng = _same_rng(before.rng, after.rng)
    if rng:
        found.append(f"global random state changed ({', '.join(rng)}); draw from a generator of the method's own")
    return found


def _same_grad(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@contextlib.contextmanager
def forwards_in_train_mode(model: torch.nn.Module) -> Iterator[list[str]]:
    """The names of the model's modules that ran forward in train mode while the block ran."""
    seen: list[str] = []
    names = {m: n or "(the model)" for n, m in model.named_modules() if not list(m.children())}

    def hook(module: torch.nn.Module, args: Any) -> None:
        if module.training and module in names and names[module] not in seen:
            seen.append(names[module])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
