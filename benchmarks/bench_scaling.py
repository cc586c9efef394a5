"""The ``scaling`` benchmark suite: it ships in the package, :mod:`gradstats.bench.suites.scaling`.

This file only re-exports it, so ``gradstats bench --dir benchmarks`` keeps working; run the suite
with ``gradstats bench scaling`` (no checkout needed).
"""

from gradstats.bench.suites.scaling import comparisons

__all__ = ["comparisons"]
