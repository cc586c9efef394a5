"""The ``eqprop`` benchmark suite: it ships in the package, :mod:`gradstats.bench.suites.eqprop`.

This file only re-exports it, so ``gradstats bench --dir benchmarks`` keeps working; run the suite
with ``gradstats bench eqprop`` (no checkout needed).
"""

from gradstats.bench.suites.eqprop import comparisons

__all__ = ["comparisons"]
