"""``gradstats bench``: run benchmark suites side by side and write JSON records."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from gradstats.bench._allocator import ALLOCATORS
from gradstats.cli._config import add_config_arguments, config_from_args, option
from gradstats.errors import ConfigurationError

__all__ = ["BenchConfig", "register"]


@dataclass(frozen=True)
class BenchConfig:
    names: tuple[str, ...] = option(
        (), "suites to run (default: all; see --list)", positional=True, nargs="*", metavar="SUITE"
    )
    smoke: bool = option(False, "tiny sizes and 2 repeats: checks that every suite still runs")
    repeats: int = option(20, "timed calls per candidate (2 with --smoke)")
    warmup: int = option(3, "untimed calls per candidate before timing (1 with --smoke)")
    out: Path = option(Path("bench-results"), "folder for the JSON records (one per suite)")
    dir: Path | None = option(
        None,
        "a folder of bench_<name>.py suites to run instead of the built-in ones "
        "(default: $GRADSTATS_BENCHMARKS, else the suites shipped with gradstats)",
    )
    allocator: str = option(
        "steady",
        "CPU heap while timing: 'steady' (glibc without trimming or mmap, so that no call pays "
        "page faults for memory an earlier call gave back; the process keeps its peak heap) or "
        "'stock' (the C library's defaults)",
        choices=ALLOCATORS,
    )
    list: bool = option(False, "list the available suites and exit")


def run(args: argparse.Namespace) -> int:
    from gradstats.bench import default_directory, find_suites, run_suites

    config = config_from_args(BenchConfig, args)
    directory = config.dir if config.dir is not None else default_directory()
    if config.list:
        for name, source in find_suites(directory).items():
            print(f"{name:20s} {source}")
        return 0
    repeats, warmup = config.repeats, config.warmup
    if config.smoke:
        repeats = min(repeats, 2)
        warmup = min(warmup, 1)
    if repeats < 1 or warmup < 0:
        raise ConfigurationError(
            f"--repeats must be >= 1 and --warmup >= 0; got {repeats}, {warmup}"
        )
    if directory is not None and not find_suites(directory):
        raise ConfigurationError(f"--dir {directory}: no bench_<name>.py suites in this folder")
    try:
        run_suites(
            list(config.names),
            directory=directory,
            out=config.out,
            smoke=config.smoke,
            warmup=warmup,
            repeats=repeats,
            allocator=config.allocator,
        )
    except (SyntaxError, ImportError) as error:  # a suite file that does not import
        filename = getattr(error, "filename", None)
        where = f"{filename}: " if filename else ""
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ConfigurationError(
            f"a benchmark suite cannot be imported: {where}{type(error).__name__}: {reason}"
        ) from None
    print(f"JSON records written to {config.out.resolve()}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench",
        help="run benchmarks side by side (ours, baselines, peers) and report ratios",
        description=(
            "Run the benchmark suites shipped with gradstats (gradstats.bench.suites; see "
            "--list). Candidates run interleaved after a warm-up; the table shows medians, IQRs, "
            "ratios to the baseline, peak memory where measured, and whether each candidate's "
            "numbers match the reference. A comparison that needs a missing optional peer or "
            "extra is skipped with a note."
        ),
    )
    add_config_arguments(parser, BenchConfig)
    parser.set_defaults(run=run)
