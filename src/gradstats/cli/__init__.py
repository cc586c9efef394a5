"""The ``gradstats`` command line (also ``python -m gradstats``).

Each subcommand lives in its own module with a frozen dataclass of options and a
``register(subparsers)`` function. Bad input exits with status 2 and a one-line reason
(set ``GRADSTATS_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from gradstats._version import __version__
from gradstats.cli import _bench, _demo, _eqprop, _fisher

__all__ = ["CLIError", "build_parser", "main"]

_SUBCOMMANDS = (_demo, _bench, _eqprop, _fisher)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradstats",
        description=(
            "Gradient estimators and gradient statistics for PyTorch, each checked against "
            "its exact reference."
        ),
        epilog="Run 'gradstats COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"gradstats {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _SUBCOMMANDS:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as error:
        if os.environ.get("GRADSTATS_DEBUG"):
            raise
        print(f"gradstats {args.command}: error: {error}", file=sys.stderr)
        return 2
