"""The user's config folders in Hydra's search path, before cl-runner's own configs: the folders of
``CL_RUNNER_CONFIG_PATH`` and the config packages of installed extensions (entry point group
``cl_runner.configs``). The order and the rules: :mod:`cl_runner.configpath`. Hydra calls every
SearchPathPlugin for every application; this one changes only cl-runner's search path."""

# no `from __future__ import annotations`: Hydra executes this module before it is in sys.modules

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from cl_runner.configpath import extend


class ClRunnerSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        extend(search_path)
