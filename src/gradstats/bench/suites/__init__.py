"""The benchmark suites shipped with gradstats, one module per pillar.

Each module defines ``comparisons(smoke: bool) -> list[Comparison | Skipped]``; ``gradstats bench
<name>`` runs the module ``gradstats.bench.suites.<name>``. They ship inside the package, so the
command works from an installed gradstats (no source checkout needed). A comparison that needs a
missing optional peer or extra is returned as a :class:`~gradstats.bench.Skipped` note.
"""

from __future__ import annotations

import pkgutil

__all__ = ["suite_names"]


def suite_names() -> list[str]:
    """Names of the built-in suites, sorted (the modules of this package)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
