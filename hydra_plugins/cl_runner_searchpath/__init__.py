"""cl-runner's Hydra search path plugin (found by Hydra in the ``hydra_plugins`` namespace): the user's
config folders before cl-runner's own; see :mod:`cl_runner.configpath`."""
