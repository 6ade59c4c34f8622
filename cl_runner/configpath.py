"""Where cl-runner's configs come from: its own (``configs/``, shipped as ``cl_runner.configs``) and the
user's. Hydra looks a config up in this order; the first folder that has it wins, and every folder's
options join the groups:

1. the folders of ``CL_RUNNER_CONFIG_PATH`` (``:``-separated, in that order);
2. installed extensions: every entry point of group ``cl_runner.configs`` (its value a ``pkg://``
   config package, or the package's module name), in the order of the entry point names;
3. cl-runner's own configs;
4. ``--config-dir`` and ``hydra.searchpath`` (on the command line, or in a primary config): Hydra puts
   them after the application's own configs, so their options join the groups but one named like
   one of cl-runner's is not used (precheck says so).

1 and 2 come before cl-runner's own so that a user's option may shadow a built-in one (precheck
prints one warning line for it). They are added by Hydra's SearchPathPlugin mechanism
(``hydra_plugins/cl_runner_searchpath``), so every composition of cl-runner's primary config sees
them: ``cl-run``, its precheck and sweeps, ``cl-run-check``, the compose API; a Hydra application
other than cl-runner is left alone.

Precheck (:class:`Search`) reads the group options the way Hydra's own config loader does, with the
same search path (also ``hydra.searchpath``, ``--config-dir`` and ``--config-name``), refuses a user
folder that does not exist, and lists the options that shadow others.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

#: the environment variable of the user's config folders, and the entry point group of installed ones
ENV = "CL_RUNNER_CONFIG_PATH"
ENTRY_POINTS = "cl_runner.configs"
CONFIG_MODULE = "cl_runner.configs"
MAIN = f"pkg://{CONFIG_MODULE}"
#: the provider of an entry point's folder in Hydra's search path (``cl-run --info searchpath``)
INSTALLED = "installed package"


def env_folders() -> list[str]:
    """The folders of :data:`ENV` as absolute ``file://`` paths, in order (empty entries ignored)."""
    return [f"file://{os.path.abspath(os.path.expanduser(p))}" for p in os.environ.get(ENV, "").split(":") if p]


@functools.lru_cache(maxsize=8)
def _entry_points(path: tuple[str, ...]) -> tuple[tuple[str, str, str], ...]:
    from importlib.metadata import entry_points

    found = {}
    for ep in entry_points(group=ENTRY_POINTS):
        dist = getattr(ep.dist, "name", None) or "?"
        found.setdefault(ep.name, (ep.name, ep.value.strip(), dist))  # the first on sys.path, as imports
    return tuple(found[name] for name in sorted(found))


def installed() -> list[tuple[str, str, str]]:
    """(entry point name, its config folder as a Hydra search path, distribution) of every installed
    extension, by entry point name. A value without a scheme is a module: ``pkg://<value>``."""
    result = []
    for name, value, dist in _entry_points(tuple(sys.path)):
        path = value if "://" in value else f"pkg://{value}"
        result.append((name, path, dist))
    return result


def user_sources() -> list[tuple[str, str]]:
    """(provider, path) of the user's folders that come before cl-runner's own (1 and 2 above)."""
    return [(ENV, p) for p in env_folders()] + [(f"{INSTALLED} {dist}", path) for _, path, dist in installed()]


def extend(search_path: Any) -> None:
    """Hydra's search path with the user's folders put before cl-runner's own configs; only when the
    primary config is cl-runner's (the SearchPathPlugin calls this for every Hydra application)."""
    from hydra.core.config_search_path import SearchPathQuery

    main = SearchPathQuery(provider="main", path=MAIN)
    if search_path.find_first_match(main) == -1:
        return
    for provider, path in user_sources():
        search_path.prepend(provider=provider, path=path, anchor=main)


def search_path(config_dir: str | None = None) -> Any:
    """The search path Hydra builds for cl-run (its plugins included), with ``--config-dir``."""
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    path = create_config_search_path(MAIN)
    if config_dir is not None:  # as hydra._internal.utils.run_hydra adds it
        path.prepend("command-line", f"file://{os.path.abspath(config_dir)}", anchor=SearchPathQuery(provider="schema"))
    return path


@contextlib.contextmanager
def initialized(config_dir: str | None = None, path: Any = None) -> Iterator[Any]:
    """Hydra initialized for composing cl-run's config (``hydra.compose``) with its search path (or
    ``path``); yields Hydra. The previous global state of Hydra is restored afterwards."""
    from hydra._internal.hydra import Hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from hydra.version import setbase

    backup = get_gh_backup()
    setbase("1.3")
    try:
        GlobalHydra.instance().clear()
        yield Hydra.create_main_hydra2(task_name="cl-run", config_search_path=path or search_path(config_dir))
    finally:
        restore_gh_from_backup(backup)


class Search:
    """What a command line composes from: ``--config-dir``, ``--config-name`` and ``hydra.searchpath``
    (given as its override, ``hydra.searchpath=[…]``)."""

    def __init__(self, config_dir: str | None = None, config_name: str | None = None, searchpath: Sequence[str] = ()):
        self.config_dir, self.config_name, self.searchpath = config_dir, config_name or "config", list(searchpath)

    def repository(self) -> Any:
        """Hydra's config repository for this command line: the search path with ``hydra.searchpath``
        applied (from the override, else from the primary config), as Hydra's loader composes with."""
        with initialized(self.config_dir) as app, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Hydra's warning about a folder that does not exist: problems() says it
            loader = app.config_loader
            name = self.config_name if _exists(loader, self.config_name) else None
            return loader._parse_overrides_and_create_caching_repo(name, self.searchpath)[1]

    def full_path(self, repo: Any = None) -> Any:
        """The whole search path as Hydra composes with it (``hydra.searchpath`` included), for a Hydra
        whose own listing of groups (``--help``) should show every folder's options."""
        from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

        path = ConfigSearchPathImpl()
        for source in (repo or self.repository()).get_sources():
            path.append(source.provider, f"{type(source).scheme()}://{source.path}")
        return path

    def groups(self, repo: Any = None) -> dict[str, list[str]]:
        """Every config group (but Hydra's own) and its options, from every folder of the search path."""
        from hydra.core.object_type import ObjectType

        repo = repo or self.repository()
        names = [g for g in repo.get_group_options("", ObjectType.GROUP) if g != "hydra"]
        return {g: sorted(repo.get_group_options(g, ObjectType.CONFIG)) for g in names}


def _exists(loader: Any, config_name: str) -> bool:
    try:
        return loader.repository.config_exists(config_name)
    except Exception:  # noqa: BLE001 - a source that cannot be read: the check below names it
        return False


def _where(source: Any) -> str:
    scheme = type(source).scheme()
    return source.path if scheme == "file" else f"{scheme}://{source.path}"


def _user(source: Any) -> bool:
    return source.provider not in ("hydra", "main", "schema")


def problems(repo: Any) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the user's folders: a folder of ``CL_RUNNER_CONFIG_PATH``,
    ``--config-dir`` or ``hydra.searchpath`` that does not exist is an error (one line naming where it
    was given); an installed extension whose config package cannot be read, a warning."""
    errors, warnings = [], []
    for source in repo.get_sources():
        if not _user(source):
            continue
        why = _unavailable(source)
        if why is None:
            continue
        where = _where(source)
        if source.provider.startswith(INSTALLED):
            warnings.append(f"warning: {source.provider}: its {ENTRY_POINTS} entry point {where} {why}; ignored")
        elif source.provider == ENV:
            errors.append(f"{ENV}: {where} {why}")
        elif source.provider == "command-line":
            errors.append(f"--config-dir: {where} {why}")
        else:
            errors.append(f"hydra.searchpath: {where} {why}")
    return errors, warnings


def _unavailable(source: Any) -> str | None:
    """Why a config source cannot be read (None: it can)."""
    scheme = type(source).scheme()
    if scheme == "file":
        return None if os.path.isdir(source.path) else "is not a folder"
    if scheme != "pkg":
        return None
    try:
        importlib.import_module(source.path)
    except ModuleNotFoundError as e:
        return f"cannot be imported (no module named {e.name!r})"
    except Exception as e:  # noqa: BLE001 - the package's own import failed
        return f"cannot be imported ({type(e).__name__}: {' '.join(str(e).split())})"
    if not source.available():
        return "is not a package with an __init__.py"
    return None


def shadowing(repo: Any) -> list[str]:
    """One warning line per config that a folder earlier in the search path hides in a later one:
    a user's option shadowing cl-runner's own, or, from a folder after cl-runner's (``hydra.searchpath``,
    ``--config-dir``), hidden by it."""
    sources, seen = [], set()
    for s in repo.get_sources():  # a folder given twice is looked up once: at its first place
        if s.provider not in ("hydra", "schema") and _where(s) not in seen and _unavailable(s) is None:
            sources.append(s)
            seen.add(_where(s))
    if not any(_user(s) for s in sources):
        return []
    lines = []
    for group in _all_groups(sources):
        holders: dict[str, list[Any]] = {}
        for source in sources:
            if source.is_group(group):
                for option in source.list(group, _config_type()):
                    holders.setdefault(option, []).append(source)
        for option, found in sorted(holders.items()):
            lines.extend(_shadow_lines(group, option, found))
    return lines


def _config_type() -> Any:
    from hydra.core.object_type import ObjectType

    return ObjectType.CONFIG


def _all_groups(sources: list[Any]) -> list[str]:
    """Every group path in any of ``sources`` ("" = the top level), Hydra's own ``hydra/`` left out."""
    from hydra.core.object_type import ObjectType

    found, todo = [], [""]
    while todo:
        group = todo.pop()
        found.append(group)
        subgroups = {s2 for s in sources if s.is_group(group) for s2 in s.list(group, ObjectType.GROUP)}
        todo.extend(sorted(g for g in subgroups if g != "hydra" and not g.startswith("hydra/")))
    return sorted(found)


def _label(group: str, option: str) -> str:
    if not group:
        return f"{option}.yaml"
    return f"{group}={option}" if "/" not in group else f"{group}/{option}.yaml"


def _shadow_lines(group: str, option: str, found: list[Any]) -> list[str]:
    if len(found) < 2:
        return []
    label, first = _label(group, option), found[0]
    lines = []
    for later in found[1:]:
        if later.provider == "main":
            lines.append(f"warning: {label} from {_where(first)} shadows cl-runner's own")
        elif first.provider == "main":
            lines.append(
                f"warning: {label} from {_where(later)} is not used: cl-runner's own comes first (hydra.searchpath "
                f"and --config-dir folders come after cl-runner's configs; to shadow it, put the folder in {ENV})"
            )
        else:
            lines.append(f"warning: {label} from {_where(first)} shadows the one from {_where(later)}")
    return lines
