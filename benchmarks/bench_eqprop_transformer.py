"""The ``eqprop_transformer`` benchmark suite: it ships in the package, as
:mod:`gradstats.bench.suites.eqprop_transformer`.

This file only re-exports it, so ``gradstats bench --dir benchmarks`` keeps working; run the suite
with ``gradstats bench eqprop_transformer`` (no checkout needed).
"""

from gradstats.bench.suites.eqprop_transformer import comparisons

__all__ = ["comparisons"]
