#!/usr/bin/env python
"""Rebuild the summary (summary.csv, summary.md, summary_grouped.csv, tradeoff.png) of a finished,
partial or interrupted sweep: a thin wrapper around ``cl-run-summary`` (cl_runner/report/summary.py).

    python scripts/summarize.py outputs/sweeps/2025-01-01_12-00-00 [--joint DIR] [--quiet]

Jobs without metrics.json, and jobs of the sweep's multirun.yaml that never got a folder, are
listed as "missing". Exit code 0 when every job is ok, 1 otherwise, 2 for a path that is not a sweep.
"""

import sys

from cl_runner.report.summary import main

if __name__ == "__main__":
    sys.exit(main())
