"""Find benchmark suites (``benchmarks/bench_*.py``), run them, print tables, write JSON.

A suite is a Python file that defines ``comparisons(smoke: bool) -> Iterable[Comparison]``.
``smoke=True`` asks for tiny sizes: CI runs every suite that way so none goes stale.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType

from gradstats._format import format_table
from gradstats.bench._harness import Comparison, run_comparison
from gradstats.bench._record import environment

__all__ = ["default_directory", "find_suites", "format_record", "run_suites"]

ENV_DIRECTORY = "GRADSTATS_BENCHMARKS"


def default_directory() -> Path:
    """``$GRADSTATS_BENCHMARKS``, else ``./benchmarks``, else the checkout's ``benchmarks/``."""
    if os.environ.get(ENV_DIRECTORY):
        return Path(os.environ[ENV_DIRECTORY])
    here = Path.cwd() / "benchmarks"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[3] / "benchmarks"


def find_suites(directory: Path) -> dict[str, Path]:
    """Map suite name (``bench_<name>.py`` -> ``<name>``) to its file."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"no benchmark folder at {directory}: benchmarks live in the source repository "
            f"(pass --dir or set {ENV_DIRECTORY})"
        )
    return {p.stem.removeprefix("bench_"): p for p in sorted(directory.glob("bench_*.py"))}


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"gradstats_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "comparisons", None)):
        raise ValueError(f"{path} does not define comparisons(smoke: bool)")
    return module


def format_record(record: dict) -> str:
    """The table printed for one comparison."""
    rows = []
    for row in record["candidates"]:
        rows.append(
            [
                row["name"],
                row["median_s"] * 1e3,
                row["iqr_s"] * 1e3,
                row["ratio_to_baseline"],
                None if "peak_bytes" not in row else row["peak_bytes"] / 2**20,
                "-" if "agrees" not in row else ("yes" if row["agrees"] else "NO"),
                row["note"],
            ]
        )
    headers = [
        "candidate",
        "median ms",
        "IQR ms",
        f"x {record['baseline']}",
        "peak MiB",
        "same",
        "note",
    ]
    lines = [f"{record['comparison']}  ({record['device']}, {record['repeats']} repeats)"]
    lines.append(format_table(rows, headers))
    lines.extend(f"  skipped {name}: {why}" for name, why in record["unavailable"].items())
    return "\n".join(lines)


def run_suites(
    names: Sequence[str],
    *,
    directory: Path,
    out: Path | None,
    smoke: bool,
    warmup: int,
    repeats: int,
    progress: bool = True,
) -> list[dict]:
    """Run the named suites (all when ``names`` is empty); print and return their records."""
    suites = find_suites(directory)
    unknown = [n for n in names if n not in suites]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; available: {', '.join(suites)}")
    env = environment()
    results = []
    for name in names or list(suites):
        comparisons: Iterable[Comparison] = _load(suites[name]).comparisons(smoke)
        records = [
            run_comparison(c, warmup=warmup, repeats=repeats, progress=progress)
            for c in comparisons
        ]
        for record in records:
            print(format_record(record), end="\n\n", flush=True)
        result = {"suite": name, "smoke": smoke, "environment": env, "comparisons": records}
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        results.append(result)
    return results
