"""The ``moments`` benchmark suite: it ships in the package, :mod:`gradstats.bench.suites.moments`.

This file only re-exports it, so ``gradstats bench --dir benchmarks`` keeps working; run the suite
with ``gradstats bench moments`` (no checkout needed).
"""

from gradstats.bench.suites.moments import comparisons

__all__ = ["comparisons"]
