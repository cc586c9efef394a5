"""``gradstats bench``: run benchmark suites side by side and write JSON records."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from gradstats.cli._config import add_config_arguments, config_from_args, option

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
        None, "benchmark folder (default: ./benchmarks or the source checkout's)"
    )
    list: bool = option(False, "list the available suites and exit")


def run(args: argparse.Namespace) -> int:
    from gradstats.bench import default_directory, find_suites, run_suites

    config = config_from_args(BenchConfig, args)
    directory = config.dir or default_directory()
    if config.list:
        for name, path in find_suites(directory).items():
            print(f"{name:12s} {path}")
        return 0
    repeats, warmup = config.repeats, config.warmup
    if config.smoke:
        repeats = min(repeats, 2)
        warmup = min(warmup, 1)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0; got {repeats}, {warmup}")
    run_suites(
        list(config.names),
        directory=directory,
        out=config.out,
        smoke=config.smoke,
        warmup=warmup,
        repeats=repeats,
    )
    print(f"JSON records written to {config.out.resolve()}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench",
        help="run benchmarks side by side (ours, baselines, peers) and report ratios",
        description=(
            "Run benchmark suites from the repository's benchmarks/ folder. Candidates run "
            "interleaved after a warm-up; the table shows medians, IQRs, ratios to the baseline, "
            "peak memory where measured, and whether each candidate's numbers match the reference."
        ),
    )
    add_config_arguments(parser, BenchConfig)
    parser.set_defaults(run=run)
