"""Optional peers and extras: a comparison that needs a missing module is skipped with a note.

Benchmarks compare gradstats with peers (BackPACK, Opacus, torchdeq) and build models from
extras (``transformers``). None of them is a dependency of gradstats, so a suite asks
:func:`missing` before it builds such a comparison, and returns a :class:`Skipped` record in its
place; the runner prints the note and writes it to the JSON record instead of crashing the suite.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["Skipped", "is_optional_import_error", "missing"]

# The pip names of the optional modules, for the install hint of a note.
_PIP_NAMES = {
    "backpack": "backpack-for-pytorch",
    "opacus": "opacus",
    "torchdeq": "torchdeq",
    "transformers": "transformers (the `hf` extra)",
}


@dataclass(frozen=True)
class Skipped:
    """A comparison (or a whole suite) that cannot run here, and why.

    Attributes:
        name: ``"<suite>/<case>"`` of the comparison that was not built.
        reason: one line, e.g. ``"needs transformers (the `hf` extra): not installed"``.
    """

    name: str
    reason: str


def missing(*modules: str) -> str | None:
    """``None`` when every module imports; otherwise a one-line note naming the missing ones.

    >>> missing("math") is None
    True
    >>> missing("no_such_module_xyz")
    'needs no_such_module_xyz: not installed'
    """
    absent = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            absent.append(_PIP_NAMES.get(module, module))
    if not absent:
        return None
    return f"needs {', '.join(absent)}: not installed"


def is_optional_import_error(error: ImportError) -> bool:
    """True when ``error`` is about a module other than gradstats itself.

    A broken gradstats import is a bug and must fail loudly; a missing peer or extra is a skip.
    """
    name = error.name or ""
    return not (name == "gradstats" or name.startswith("gradstats."))
