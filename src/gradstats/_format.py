"""Plain-text tables for terminals, reports and logs."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_number", "format_table"]


def format_number(value: object, digits: int = 4) -> str:
    """Short, aligned-looking rendering of numbers; other values are ``str()``-ed."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.{digits}g}"
        return f"{value:.{max(digits - 2, 1)}e}"
    return str(value)


def format_table(
    rows: Sequence[Sequence[object]], headers: Sequence[str], markdown: bool = False
) -> str:
    """Render ``rows`` under ``headers``; numbers right-aligned, text left-aligned.

    Example:
        >>> print(format_table([["a", 1.5], ["bb", 20]], ["name", "value"]))
        name  value
        ----  -----
        a       1.5
        bb       20
    """
    cells = [[format_number(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) for row in rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    rule = ["-" * w for w in widths]
    if markdown:
        rule = [
            ("-" * (w - 1) + ":") if num else "-" * w
            for w, num in zip(widths, numeric, strict=True)
        ]
    return "\n".join([line(list(headers)), line(rule), *(line(row) for row in cells)])
