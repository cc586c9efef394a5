"""The argument parser of every gradstats command: errors come from the command that has them.

Plain :mod:`argparse` hands a subcommand's unknown options up to the top-level parser, which
prints the *top-level* usage (``gradstats [-h] [--version] COMMAND ...``) — of no help for
``gradstats eqprop train --stpes 3``. :class:`Parser` makes the innermost command report its own
unknown options with its own usage, and adds a "did you mean" (:func:`difflib.get_close_matches`)
for a mistyped option, subcommand or choice.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Parser", "suggest"]


def suggest(word: str, candidates: Iterable[str]) -> str:
    """``" (did you mean X?)"`` for the closest candidate to ``word``, or ``""``."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class Parser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose subcommands report their own unknown options.

    Subparsers created by :meth:`add_subparsers` are of this class too.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            options = [a for a in extras if a.startswith("-") and len(a) > 1]
            hint = ""
            if options:
                known = [s for s in self._option_string_actions if s.startswith("--")]
                hint = suggest(options[0].split("=", 1)[0], known)
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed, extras

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is not None and value not in choices:
            names = [str(c) for c in choices]
            listed = ", ".join(repr(c) for c in names)
            close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r} (choose from {listed}){hint}"
            )
        super()._check_value(action, value)
