"""The ``fisher`` benchmark suite: it ships in the package, :mod:`gradstats.bench.suites.fisher`.

This file only re-exports it, so ``gradstats bench --dir benchmarks`` keeps working; run the suite
with ``gradstats bench fisher`` (no checkout needed).
"""

from gradstats.bench.suites.fisher import comparisons

__all__ = ["comparisons"]
