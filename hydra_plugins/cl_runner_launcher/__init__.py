"""cl-runner's Hydra launcher plugin (found by Hydra in the ``hydra_plugins`` namespace): see
:mod:`hydra_plugins.cl_runner_launcher.slurm_launcher`."""
