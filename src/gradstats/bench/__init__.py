"""Benchmark harness: side-by-side timings with ratios, agreement checks and JSON records.

Suites live in the repository's ``benchmarks/`` folder and run with ``gradstats bench``.
"""

from gradstats.bench._harness import Candidate, Comparison, run_comparison
from gradstats.bench._memory import peak_memory_bytes
from gradstats.bench._record import environment
from gradstats.bench._runner import default_directory, find_suites, format_record, run_suites

__all__ = [
    "Candidate",
    "Comparison",
    "default_directory",
    "environment",
    "find_suites",
    "format_record",
    "peak_memory_bytes",
    "run_comparison",
    "run_suites",
]
