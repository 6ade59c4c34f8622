"""An example extension of cl-runner: a method (:mod:`cl_example.sqgrad`), a model
(:mod:`cl_example.resmlp`) and their configs (``cl_example/configs``), declared to cl-runner by the
entry point ``cl_runner.configs`` in pyproject.toml."""
