"""Config nodes become objects through Hydra's own instantiation (``hydra.utils.instantiate``): each
node of the ``model``, ``optimizer`` and ``method`` groups names its class in ``_target_`` and sets
``_partial_: true``, because the object needs something only the run has (the input shape and output
count, the parameters, the strength λ). Every other key is a constructor argument, except the
run-identity labels ``name`` and ``lambda`` (the method's λ, passed as ``strength``)."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

LABELS = ("name", "lambda")


def _container(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def options(node: Any) -> dict[str, Any]:
    """The constructor arguments of a config node, resolved (no ``_…_`` keys, no labels)."""
    return {k: v for k, v in _container(node).items() if not str(k).startswith("_") and k not in LABELS}


def partial(node: Any, group: str) -> functools.partial:
    """``functools.partial`` of the node's ``_target_`` with its options (Hydra's ``_partial_``);
    ValueError (one line) when the node has no importable target."""
    target = _container(node).get("_target_")
    if not target:
        raise ValueError(f"{group} {node.get('name')!r} has no _target_ (the class to build; see CONTRIBUTING.md)")
    locate(f"{group}._target_", str(target))
    try:
        return instantiate({"_target_": target, "_partial_": True, **options(node)}, _convert_="all")
    except InstantiationException as e:
        raise ValueError(f"{group}._target_={target!r} cannot be built: {e.__cause__ or e}") from None


def locate(key: str, target: str) -> Any:
    """The object a ``_target_`` names (``package.module.Class``); ValueError, one line naming ``key``, the
    module and Python's error, when it cannot be imported (no such module, an import inside the module
    that fails, a syntax error) or the module has no such attribute."""
    parts = target.split(".")
    if not all(parts):
        raise ValueError(f"{key}={target}: not a dotted name of a class (package.module.Class)")
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            raise ValueError(f"{key}={target}: importing module {module} failed: {_error(e)}") from None
        except Exception as e:  # noqa: BLE001 - whatever the module raised while being imported
            raise ValueError(f"{key}={target}: importing module {module} failed: {_error(e)}") from None
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                raise ValueError(f"{key}={target}: module {module} has no {'.'.join(parts[i:])}") from None
            obj = getattr(obj, attr)
        return obj
    raise ValueError(
        f"{key}={target}: no module named {parts[0]} (is its folder on PYTHONPATH, or its package installed?)"
    )


def _error(e: BaseException) -> str:
    if isinstance(e, SyntaxError):
        where = f" ({e.filename}, line {e.lineno})" if e.filename else ""
        return f"SyntaxError: {e.msg}{where}"
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


class Unknown(list):
    """Sorted unknown option names, with the ``valid`` ones."""

    valid: list[str]


def unknown_options(cls: Any, given: Mapping[str, Any], skip: tuple[str, ...] = ()) -> Unknown:
    """Options in ``given`` that ``cls``'s constructor does not take (``skip``: the ones the run passes).
    A constructor with ``**kwargs`` takes any name (its own checks refuse what it does not know)."""
    params = inspect.signature(cls).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    bad = Unknown([] if takes_any else sorted(set(given) - named))
    bad.valid = sorted(p for p in named if p not in skip)
    return bad


def check_buffer(cfg: Any) -> None:
    """The run's ``buffer`` (a memory size) against the chosen method's table of best arguments.

    A preset whose memory methods take their arguments per memory size (the der2020_* presets) gives
    such a method a table ``_best`` keyed by size in its protocol file, and the method's options
    interpolate from the entry ``buffer`` selects. A size without an entry (or none given) is refused
    here, before anything resolves that interpolation; methods without a table ignore ``buffer``.
    Raises ValueError with one line naming ``buffer`` and the valid sizes.
    """
    buffer = cfg.get("buffer")
    if buffer is not None and (isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1):
        raise ValueError(f"buffer must be a positive integer (a memory size) or null, got {buffer!r}")
    method = cfg.get("method")
    best = method.get("_best") if method is not None else None
    if best is None:
        if buffer is not None and method is not None and "buffer_size" in method:
            # a memory method outside a preset with a table: `buffer` would silently do nothing
            raise ValueError(
                f"buffer={buffer}: method={method.get('name')} has no table of best arguments per memory size "
                f"here (the der2020_* presets have); set its memory size with method.buffer_size={buffer}"
            )
        return
    sizes = [str(k) for k in best]
    if buffer is None or str(buffer) not in sizes:
        raise ValueError(
            f"buffer={'null' if buffer is None else buffer}: method={method.get('name')} takes its memory size and "
            f"best arguments from buffer; choose one of: {', '.join(sizes)}"
        )
