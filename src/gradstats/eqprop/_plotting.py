"""Figures of the eqprop pillar: readable axes (shared with ``curves.png``) and ``probe.png``.

Axis rules, applied by the helpers below:

* an integer setting (steps T1/T2, the number N of holomorphic nudges, training steps) gets
  integer ticks — at the swept values when there are few, plain labels (``5``, ``20``), never
  ``2×10⁰``; a sweep spanning ≥ 8× is drawn on a base-2 log axis, training steps linearly;
* a real setting (β, r) gets its swept values as ticks (``0.025``), on a log axis when they
  span ≥ 4×;
* a log-scale error or residual gets whole decades as limits, labels only at decades (no crowded
  minor labels);
* after layout, :func:`thin_overlaps` drops every other tick label of an axis whose labels
  still overlap;
* every panel with labelled lines has a legend, every row x-labels, and an empty panel a note
  (:func:`note`).

``probe.png`` (:func:`probe_figure`): one column per sweep — T1, T2, β (EP/AEP: the real nudge),
r (holomorphic: the radius of the circle of nudges β_k = r e^{2πik/N}; a ``beta`` sweep of a
holomorphic method), N — with the relative error vs the implicit gradient on top and the adjoint
residual below, one colour per method in every panel; without sweeps, bars per parameter group.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from gradstats.eqprop._registry import ESTIMATORS

__all__ = [
    "integer_x",
    "legend",
    "log_y",
    "note",
    "probe_figure",
    "pyplot",
    "shown_labels",
    "thin_overlaps",
    "value_x",
]

_FEW = 8  # at most this many swept values become the ticks themselves
_FLOOR = 1e-18  # errors and residuals are drawn at least this large on a log axis
#: Column order, x-labels and titles of ``probe.png`` (``r``: a holomorphic ``beta`` sweep).
_ORDER = ("T1", "T2", "beta", "r", "points")
_XLABELS = {
    "T1": "T1 (free-phase steps)",
    "T2": "T2 (nudged/adjoint steps)",
    "beta": "nudge β",
    "r": r"radius r (nudges $\beta_k = r\,e^{2\pi i k/N}$)",
    "points": "N (nudges on the circle)",
}
_TITLES = {
    "T1": "sweep T1",
    "T2": "sweep T2",
    "beta": "sweep β (EP / AEP)",
    "r": "sweep r (holomorphic)",
    "points": "sweep N (holomorphic)",
}
_INTEGER = ("T1", "T2", "points")


class _Row(Protocol):  # the fields of a ProbeRow the figure reads
    @property
    def method(self) -> str: ...
    @property
    def sweep(self) -> str | None: ...
    @property
    def value(self) -> float | None: ...
    @property
    def group(self) -> str: ...
    @property
    def rel_err(self) -> float: ...
    @property
    def res_adjoint(self) -> float | None: ...


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(values: Iterable[float | None], positive: bool = False) -> list[float]:
    out = [float(v) for v in values if v is not None and math.isfinite(v)]
    return [v for v in out if v > 0] if positive else out


def integer_x(ax: Any, values: Iterable[float | None], *, log: bool = True) -> None:
    """Integer ticks on the x axis of ``ax`` for the integer ``values`` drawn on it.

    Few values (≤ 8) are the ticks; more get integer ticks from a locator. With ``log`` and
    values spanning ≥ 8×, the axis is base-2 logarithmic.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullLocator

    ints = sorted({round(v) for v in _finite(values)})
    logscale = log and len(ints) > 1 and ints[0] > 0 and ints[-1] / ints[0] >= 8
    if logscale:
        ax.set_xscale("log", base=2)
    if 0 < len(ints) <= _FEW:
        ax.xaxis.set_major_locator(FixedLocator(ints))
    elif logscale:
        ax.xaxis.set_major_locator(LogLocator(base=2))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
    ax.xaxis.set_minor_locator(NullLocator())


def value_x(ax: Any, values: Iterable[float | None]) -> None:
    """The swept real ``values`` (β or r) as the x ticks of ``ax`` (log axis when ≥ 4× apart)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    vals = sorted(set(_finite(values, positive=True)))
    if len(vals) > 1 and vals[-1] / vals[0] >= 4:
        ax.set_xscale("log")
    if 0 < len(vals) <= _FEW:
        ax.xaxis.set_major_locator(FixedLocator(vals))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def log_y(ax: Any, values: Iterable[float | None]) -> None:
    """A log y axis for ``values``: whole decades as limits, labels at decades only."""
    from matplotlib.ticker import LogLocator, NullFormatter

    ax.set_yscale("log")
    vals = _finite(values, positive=True)
    if vals:
        low = math.floor(math.log10(min(vals) / 1.2))
        high = math.ceil(math.log10(max(vals) * 1.2))
        ax.set_ylim(10.0**low, 10.0 ** max(high, low + 1))
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=7))
    ax.yaxis.set_minor_formatter(NullFormatter())


def note(ax: Any, text: str) -> None:
    """Write ``text`` in the middle of an empty panel (and drop its meaningless ticks)."""
    ax.text(
        0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.35"
    )
    ax.set_xticks([])
    ax.set_yticks([])


def legend(ax: Any) -> None:
    """A legend on ``ax`` when it has labelled lines or bars."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def shown_labels(axis: Any) -> list[Any]:
    """The major tick labels of ``axis`` that are drawn: visible, non-empty, inside its view."""
    low, high = sorted(axis.get_view_interval())
    pairs = zip(axis.get_majorticklocs(), axis.get_majorticklabels(), strict=False)
    return [t for v, t in pairs if low <= v <= high and t.get_visible() and t.get_text()]


def _overlapping(labels: Sequence[Any], renderer: Any) -> bool:
    boxes = [t.get_window_extent(renderer) for t in labels]
    boxes.sort(key=lambda b: (b.x0, b.y0))
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def thin_overlaps(fig: Any, passes: int = 4) -> None:
    """Keep every other major tick of each axis whose tick labels overlap (after layout)."""
    from matplotlib.ticker import FixedLocator

    for _ in range(passes):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        crowded = [
            axis
            for ax in fig.axes
            for axis in (ax.xaxis, ax.yaxis)
            if _overlapping(shown_labels(axis), renderer)
        ]
        if not crowded:
            return
        for axis in crowded:
            low, high = sorted(axis.get_view_interval())
            locs = [v for v in axis.get_majorticklocs() if low <= v <= high]
            axis.set_major_locator(FixedLocator(locs[::2]))


def _holomorphic(method: str) -> bool:
    estimator = ESTIMATORS.get(method)
    if estimator is None:
        return method == "holomorphic"
    return "real" not in estimator.model_kinds


def _column(row: _Row) -> str:
    """The figure column of a swept row: its sweep, ``r`` for a holomorphic ``beta`` sweep."""
    sweep = row.sweep or ""
    return "r" if sweep == "beta" and _holomorphic(row.method) else sweep


def _sweep_panels(axes: Any, rows: Sequence[_Row], columns: list[str]) -> None:
    methods = sorted({r.method for r in rows})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for j, column in enumerate(columns):
        top, bottom = axes[0][j], axes[1][j]
        chosen = [r for r in rows if r.group == "all" and _column(r) == column]
        errors, residuals, xs_all = [], [], []
        for method in sorted({r.method for r in chosen}):
            line = sorted((r for r in chosen if r.method == method), key=lambda r: r.value or 0)
            xs = [r.value for r in line]
            xs_all += xs
            err = [max(r.rel_err, _FLOOR) for r in line]
            top.plot(xs, err, "o-", color=colors[method], label=method)
            errors += err
            res = [r.res_adjoint for r in line]
            if all(v is not None for v in res):
                ys = [max(v, _FLOOR) for v in res if v is not None]
                bottom.plot(xs, ys, "o-", color=colors[method], label=method)
                residuals += ys
        top.set(title=_TITLES.get(column, f"sweep {column}"), ylabel="rel. error vs implicit")
        bottom.set(ylabel="adjoint residual")
        for ax, ys in ((top, errors), (bottom, residuals)):
            ax.set_xlabel(_XLABELS.get(column, column))
            if column in _INTEGER:
                integer_x(ax, xs_all)
            else:
                value_x(ax, xs_all)
            log_y(ax, ys)
            legend(ax)
        if not residuals:
            note(bottom, "no adjoint residual\n(no nudged/adjoint phase)")


def _group_panels(axes: Any, rows: Sequence[_Row]) -> None:
    top, bottom = axes[0][0], axes[1][0]
    groups = [r for r in rows if r.group != "all" and r.sweep is None]
    if groups:
        errors = [max(r.rel_err, _FLOOR) for r in groups]
        top.bar(range(len(groups)), errors)
        log_y(top, errors)
        labels = [f"{r.method}/{r.group}" for r in groups]
        top.set_xticks(range(len(groups)), labels, rotation=90, fontsize=6)
    else:
        note(top, "no per-group rows")
    top.set(
        ylabel="rel. error vs implicit",
        xlabel="method / parameter group",
        title="per parameter group",
    )
    base = [r for r in rows if r.group == "all" and r.sweep is None and r.res_adjoint is not None]
    if base:
        residuals = [max(r.res_adjoint or 0.0, _FLOOR) for r in base]
        bottom.bar(range(len(base)), residuals)
        log_y(bottom, residuals)
        bottom.set_xticks(range(len(base)), [r.method for r in base], fontsize=7)
    else:
        note(bottom, "no adjoint residual\n(no nudged/adjoint phase)")
    bottom.set(ylabel="adjoint residual", xlabel="method")


def probe_figure(rows: Sequence[_Row]) -> Any:
    """The ``probe.png`` figure of a probe report's ``rows`` (a matplotlib ``Figure``; the
    caller saves and closes it)."""
    plt = pyplot()
    present = {_column(r) for r in rows if r.sweep is not None}
    columns = [c for c in _ORDER if c in present] + sorted(present - set(_ORDER))
    ncol = max(len(columns), 1)
    bars = sum(r.sweep is None and r.group != "all" for r in rows)  # without sweeps
    width = 4.4 * ncol if columns else max(4.4, 1.5 + 0.2 * bars)
    fig, axes = plt.subplots(2, ncol, figsize=(width, 6.5), squeeze=False)
    if columns:
        _sweep_panels(axes, rows, columns)
    else:
        _group_panels(axes, rows)
    fig.tight_layout()
    thin_overlaps(fig)
    return fig
