"""Reporting: a run's files (``files``), TensorBoard (``tb``), the terminal (``terminal``) and the
sweep summary (``summary``). Field names and formatting come from :mod:`cl_runner.schema`."""
