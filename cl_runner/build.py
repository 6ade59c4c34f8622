"""Config nodes become objects through Hydra's own instantiation (``hydra.utils.instantiate``): each
node of the ``model``, ``optimizer`` and ``method`` groups names its class in ``_target_`` and sets
``_partial_: true``, because the object needs something only the run has (the input shape and output
count, the parameters, the strength λ). Every other key is a constructor argument, except the
run-identity labels ``name`` and ``lambda`` (the method's λ, passed as ``strength``)."""

from __future__ import annotations

import functools
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
    try:
        return instantiate({"_target_": target, "_partial_": True, **options(node)}, _convert_="all")
    except InstantiationException as e:
        raise ValueError(f"{group}._target_={target!r} cannot be built: {e.__cause__ or e}") from None


class Unknown(list):
    """Sorted unknown option names, with the ``valid`` ones."""

    valid: list[str]


def unknown_options(cls: Any, given: Mapping[str, Any], skip: tuple[str, ...] = ()) -> Unknown:
    """Options in ``given`` that ``cls``'s constructor does not take (``skip``: the ones the run passes)."""
    params = inspect.signature(cls).parameters
    bad = Unknown(sorted(set(given) - set(params)))
    bad.valid = sorted(p for p in params if p not in skip)
    return bad
