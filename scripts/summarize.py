#!/usr/bin/env python
"""Rebuild the summary (summary.csv, summary.md, summary_grouped.csv) of a finished or partial sweep.

    python scripts/summarize.py outputs/sweeps/2025-01-01_12-00-00 [--quiet]

Reads every job folder's metrics.json (jobs without one are listed as "missing") and prints the
tables; the same code runs as the Hydra callback at the end of each multirun (cl_runner/sweep.py).
"""

import sys

from cl_runner.sweep import main

if __name__ == "__main__":
    sys.exit(main())
