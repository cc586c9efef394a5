"""Find benchmark suites, run them, print tables, write JSON.

A suite is a module (or a ``bench_<name>.py`` file) that defines
``comparisons(smoke: bool) -> Iterable[Comparison | Skipped]``. ``smoke=True`` asks for tiny
sizes: CI runs every suite that way so none goes stale.

The built-in suites live in :mod:`gradstats.bench.suites`, so ``gradstats bench`` works from an
installed package. A folder of ``bench_<name>.py`` files (``--dir`` or ``$GRADSTATS_BENCHMARKS``)
replaces them, e.g. for suites of your own.

A comparison that needs a missing optional peer or extra comes back as a
:class:`~gradstats.bench.Skipped` note; a suite whose import or ``comparisons()`` fails on a
missing module other than gradstats is skipped as a whole with a note. Both are printed and
written to the JSON record (``"skipped"``) instead of crashing the run.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from gradstats._files import write_text_atomic
from gradstats._format import format_table
from gradstats._validation import check_choice
from gradstats.bench._allocator import ALLOCATORS, steady_allocator
from gradstats.bench._harness import Comparison, run_comparison
from gradstats.bench._optional import Skipped, is_optional_import_error
from gradstats.bench._record import environment
from gradstats.bench.suites import suite_names
from gradstats.errors import ConfigurationError

__all__ = ["default_directory", "find_suites", "format_record", "run_suites"]

ENV_DIRECTORY = "GRADSTATS_BENCHMARKS"
SUITES_PACKAGE = "gradstats.bench.suites"


def default_directory() -> Path | None:
    """``$GRADSTATS_BENCHMARKS`` when set, else ``None``: the built-in suites."""
    value = os.environ.get(ENV_DIRECTORY)
    return Path(value) if value else None


def find_suites(directory: Path | None = None) -> dict[str, str | Path]:
    """Map suite name to its source: a module name (built-in) or a ``bench_<name>.py`` file.

    Args:
        directory: a folder of ``bench_<name>.py`` files to use instead of the built-in suites
            (``None``: the built-in ones, :mod:`gradstats.bench.suites`).

    Raises:
        ConfigurationError: ``directory`` is not a folder.
    """
    if directory is None:
        return {name: f"{SUITES_PACKAGE}.{name}" for name in suite_names()}
    if not directory.is_dir():
        raise ConfigurationError(
            f"no benchmark folder at {directory} (drop --dir / ${ENV_DIRECTORY} to run the "
            "suites shipped with gradstats)"
        )
    return {p.stem.removeprefix("bench_"): p for p in sorted(directory.glob("bench_*.py"))}


def _load(source: str | Path) -> ModuleType:
    if isinstance(source, str):
        module = importlib.import_module(source)
    else:
        spec = importlib.util.spec_from_file_location(f"gradstats_bench_{source.stem}", source)
        if spec is None or spec.loader is None:
            raise ConfigurationError(f"{source} is not a Python file that can be imported")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError:
            raise  # an optional peer is skipped by the caller; a gradstats import fails
        except Exception as error:  # a user's suite file (--dir) that cannot run
            first = str(error).splitlines()[0] if str(error) else ""
            raise ConfigurationError(
                f"the suite {source} failed to import: {type(error).__name__}: {first}"
            ) from error
    if not callable(getattr(module, "comparisons", None)):
        raise ConfigurationError(f"{source} does not define comparisons(smoke: bool)")
    return module


def _comparisons(source: str | Path, smoke: bool) -> list[Comparison | Skipped] | Skipped:
    """The suite's comparisons, or one :class:`Skipped` for the whole suite."""
    try:
        build: Callable[[bool], Iterable[Comparison | Skipped]] = _load(source).comparisons
        return list(build(smoke))
    except ImportError as error:
        if not is_optional_import_error(error):
            raise
        return Skipped(str(source), f"needs {error.name or error}: not installed")


def _skipped_record(item: Skipped) -> dict[str, Any]:
    return {"comparison": item.name, "skipped": item.reason, "candidates": []}


def format_record(record: Mapping[str, Any]) -> str:
    """The table printed for one comparison (one line for a skipped one)."""
    if "skipped" in record:
        return f"{record['comparison']}  skipped: {record['skipped']}"
    rows = []
    for row in record["candidates"]:
        rows.append(
            [
                row["name"],
                row["median_s"] * 1e3,
                row["iqr_s"] * 1e3,
                row["ratio_to_baseline"],
                row.get("paired_ratio"),
                None if "peak_bytes" not in row else row["peak_bytes"] / 2**20,
                row.get("minor_faults_per_call"),
                "-" if "agrees" not in row else ("yes" if row["agrees"] else "NO"),
                row["note"],
            ]
        )
    headers = [
        "candidate",
        "median ms",
        "IQR ms",
        f"x {record['baseline']}",
        "paired x",
        "peak MiB",
        "faults",
        "same",
        "note",
    ]
    lines = [f"{record['comparison']}  ({record['device']}, {record['repeats']} repeats)"]
    lines.append(format_table(rows, headers))
    for pair in record.get("pairs", []):
        low, high = pair["paired_iqr"]
        lines.append(
            f"  {pair['numerator']} ÷ {pair['denominator']}: {pair['paired_ratio']:.3f} paired "
            f"(IQR {low:.3f}–{high:.3f}), {pair['ratio_of_medians']:.3f} as a ratio of medians"
        )
    lines.extend(f"  skipped {name}: {why}" for name, why in record["unavailable"].items())
    return "\n".join(lines)


def run_suites(
    names: Sequence[str],
    *,
    directory: Path | None = None,
    out: Path | None,
    smoke: bool,
    warmup: int,
    repeats: int,
    progress: bool = True,
    allocator: str = "stock",
) -> list[dict[str, Any]]:
    """Run the named suites (all when ``names`` is empty); print and return their records.

    Each suite's record is ``{"suite", "smoke", "environment", "comparisons"}`` (plus
    ``"skipped"`` when the whole suite could not run); a skipped comparison's record is
    ``{"comparison", "skipped", "candidates": []}``. With ``out``, each record is written to
    ``out/<suite>.json``. ``allocator="steady"`` first makes the CPU heap steady for the rest
    of the process (:func:`~gradstats.bench._allocator.steady_allocator`: no page faults from
    glibc's trimming in the timings; what ``gradstats bench`` does); ``"stock"`` leaves it.

    Raises:
        ConfigurationError: an unknown suite name or ``allocator``, or a ``directory`` that is
            not a folder.
    """
    check_choice("allocator", allocator, ALLOCATORS)
    suites = find_suites(directory)
    unknown = [n for n in names if n not in suites]
    if unknown:
        raise ConfigurationError(
            f"unknown benchmark {unknown[0]!r}; available: {', '.join(suites)}"
        )
    if allocator == "steady":
        steady_allocator()
    env = environment()
    results = []
    for name in names or list(suites):
        built = _comparisons(suites[name], smoke)
        result: dict[str, Any] = {"suite": name, "smoke": smoke, "environment": env}
        if isinstance(built, Skipped):
            print(f"suite {name} skipped: {built.reason}", end="\n\n", flush=True)
            result |= {"skipped": built.reason, "comparisons": []}
        else:
            records = []
            for item in built:
                if isinstance(item, Skipped):
                    record = _skipped_record(item)
                else:
                    record = run_comparison(item, warmup=warmup, repeats=repeats, progress=progress)
                print(format_record(record), end="\n\n", flush=True)
                records.append(record)
            result["comparisons"] = records
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / f"{name}.json", json.dumps(result, indent=1))
        results.append(result)
    return results
