"""The ``gradstats`` command line (also ``python -m gradstats``).

Each subcommand lives in its own module with a frozen dataclass of options and a
``register(subparsers)`` function.

**The error contract.** A command never shows a traceback for bad input or a failing
environment: every :class:`~gradstats.errors.GradstatsError`, ``ValueError``, ``TypeError`` and
``OSError`` (missing file, permission denied, full disk, is-a-directory) is printed as one line,
``gradstats COMMAND: error: ...``, with exit status 2; Ctrl-C prints one line and exits with 130.
Set ``GRADSTATS_DEBUG=1`` to get the traceback instead. Before any compute, ``--out`` is checked
(:func:`~gradstats.cli._checks.check_out_dir`: a folder, or none yet, that can be written in) and
``--device`` resolved (:func:`~gradstats.cli._checks.resolve_device`). A mistyped option or
subcommand prints the usage of the command it was given to, with a "did you mean".
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gradstats._version import __version__
from gradstats.cli import _bench, _demo, _eqprop, _fisher, _noise
from gradstats.cli._checks import check_out_dir
from gradstats.cli._parser import Parser
from gradstats.errors import GradstatsError

__all__ = ["CLIError", "build_parser", "main"]

_SUBCOMMANDS = (_demo, _bench, _eqprop, _fisher, _noise)
INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


class CLIError(GradstatsError):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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


def _command(args: argparse.Namespace) -> str:
    """``demo``, ``eqprop train``, ...: the command as the user typed it."""
    return " ".join(str(p) for p in (args.command, getattr(args, "eqprop_command", None)) if p)


def describe(error: BaseException) -> str:
    """One line for ``error``: its message (an ``OSError`` as ``PATH: reason``)."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename is not None else ""
        text = f"{where}{error.strerror}"
    else:
        text = str(error)
    text = " ".join(text.split())  # one line, whatever the message held
    return text or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (0, 2 for an error, 130 when interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(os.environ.get("GRADSTATS_DEBUG"))
    try:
        out = getattr(args, "out", None)
        listing = getattr(args, "list", False)  # `bench --list` writes nothing
        if isinstance(out, Path) and not listing:  # every command's output, before any compute
            check_out_dir(out)
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"gradstats {_command(args)}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except (GradstatsError, ValueError, TypeError, OSError) as error:
        if debug:
            raise
        print(f"gradstats {_command(args)}: error: {describe(error)}", file=sys.stderr)
        return 2
