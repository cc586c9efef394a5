"""Benchmark harness: side-by-side timings with ratios, agreement checks and JSON records.

The suites ship in :mod:`gradstats.bench.suites` (one module per pillar) and run with
``gradstats bench`` from an installed package. A comparison that needs a missing optional peer
or extra is skipped with a note (:class:`Skipped`, :func:`missing`).
"""

from gradstats.bench._harness import Candidate, Comparison, paired_ratio, run_comparison
from gradstats.bench._memory import peak_memory_bytes
from gradstats.bench._optional import Skipped, missing
from gradstats.bench._record import environment
from gradstats.bench._runner import default_directory, find_suites, format_record, run_suites

__all__ = [
    "Candidate",
    "Comparison",
    "Skipped",
    "default_directory",
    "environment",
    "find_suites",
    "format_record",
    "missing",
    "paired_ratio",
    "peak_memory_bytes",
    "run_comparison",
    "run_suites",
]
