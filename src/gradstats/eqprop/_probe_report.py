"""What :func:`~gradstats.eqprop.probe` returns: typed rows and the report that holds them.

A :class:`ProbeRow` is one (method, sweep value, parameter group) comparison with the exact
implicit gradient; it is a frozen dataclass that also reads like the dict it used to be
(``row["cos"]``, ``row.get("anchor")``, ``dict(row)``). :class:`ProbeReport` holds the rows and
what produced them, and writes them as JSON (``rows``: one object per row, the field names
below), CSV and a PNG.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradstats._files import atomic_path, write_text_atomic
from gradstats._format import format_table
from gradstats.errors import ConfigurationError

__all__ = ["FORMAT", "VERSION", "ProbeReport", "ProbeRow"]

FORMAT, VERSION = "gradstats.eqprop.probe", 1


@dataclass(frozen=True)
class ProbeRow(Mapping[str, object]):
    """One comparison of an estimator with the exact implicit gradient, for one parameter group.

    Attributes:
        method: the estimator.
        sweep: the swept setting (``"T2"``, ``"beta"``, ``"points"``, ``"T1"``) or ``None`` for
            the base run.
        value: the swept setting's value (``None`` for the base run).
        group: the parameter group (``"all"``: every trainable parameter).
        cos: cos(g_est, g_implicit) (NaN if the estimate was skipped, or where either gradient
            of the group is exactly zero: undefined, shown so in :meth:`ProbeReport.table`).
        rel_err: ‖g_est − g_implicit‖/‖g_implicit‖ (NaN if skipped).
        adj_err: ‖a − λ‖/‖λ‖ of the adjoint estimate (``None`` for ``bptt``).
        cos_bptt: cos(g_bptt(T1), g_implicit) (``None`` without ``bptt=True``).
        res_free_T1: worst free residual of the state the estimator used.
        res_free_final: worst free residual of the reference fixed point.
        res_adjoint: worst adjoint/contrast residual of the estimator (``None``: no such phase).
        steps_free, steps_adjoint: most steps of the free and nudged/adjoint phases.
        converged_adjoint: whether the nudged/adjoint phase converged for every sample.
        skipped: the estimate was skipped (``nonfinite="skip"``).
        T1: the free-phase step cap (``bptt``: the unrolled steps).
        anchor: the AEP anchor used (``None`` without the correction).
    """

    method: str
    sweep: str | None
    value: float | None
    group: str
    cos: float
    rel_err: float
    adj_err: float | None
    cos_bptt: float | None
    res_free_T1: float | None
    res_free_final: float | None
    res_adjoint: float | None
    steps_free: int | None
    steps_adjoint: int | None
    converged_adjoint: bool | None
    skipped: bool
    T1: int
    anchor: str | None

    def __getitem__(self, key: str) -> object:
        if key not in _ROW_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_ROW_FIELDS)

    def __len__(self) -> int:
        return len(_ROW_FIELDS)

    def as_dict(self) -> dict[str, object]:
        """The row as a plain dict (JSON-ready; the field order is the CSV's columns)."""
        return {name: getattr(self, name) for name in _ROW_FIELDS}


_ROW_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ProbeRow))


@dataclass
class ProbeReport:
    """Rows of a probe run plus what produced them (JSON/CSV/PNG writers, a table).

    Attributes:
        rows: one :class:`ProbeRow` per (method, sweep value, parameter group).
        model: the probed model's class, ``describe()``, ``config()``, fingerprint and dtype.
        settings: the estimator settings applied to every method.
        reference: the reference settings and its residuals (``converged``, ``res_free``,
            ``res_adjoint``).
        asymmetry: ‖Jv − Jᵀv‖/‖Jv‖ at the reference fixed point (v random).
        sweeps: ``{sweep: [values]}``.
        warnings: the warnings raised during the probe (``"Category: message"``).
    """

    rows: list[ProbeRow]
    model: dict[str, object]
    settings: dict[str, object]
    reference: dict[str, object]
    asymmetry: float
    sweeps: dict[str, list[float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """The report as plain JSON-ready data (``rows`` as dicts)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "settings": self.settings,
            "reference": self.reference,
            "asymmetry": self.asymmetry,
            "sweeps": self.sweeps,
            "rows": [row.as_dict() for row in self.rows],
            "warnings": self.warnings,
        }

    def select(self, **match: object) -> list[ProbeRow]:
        """Rows whose fields equal ``match`` (e.g. ``method="aep", sweep="beta"``)."""
        unknown = sorted(set(match) - set(_ROW_FIELDS))
        if unknown:
            raise ConfigurationError(
                f"select() got unknown field(s) {unknown}; valid: {', '.join(_ROW_FIELDS)}"
            )
        return [r for r in self.rows if all(r[k] == v for k, v in match.items())]

    def table(self, group: str | None = "all") -> str:
        """The rows of ``group`` (all groups with ``None``) as a text table."""
        cols = ["method", "sweep", "value", "group", "cos", "rel_err", "adj_err", "cos_bptt"]
        cols += ["res_free_T1", "res_free_final", "res_adjoint", "steps_free", "steps_adjoint"]
        rows = [r for r in self.rows if group is None or r.group == group]

        def cell(row: ProbeRow, col: str) -> object:
            value = row[col]
            if col in ("cos", "cos_bptt") and isinstance(value, float):
                if math.isnan(value):  # a zero (or skipped) gradient: no direction to compare
                    return "undefined"
                return f"{value:.6f}"  # 1 − cos is what matters: keep the digits
            return value

        return format_table([[cell(r, c) for c in cols] for r in rows], cols)

    def save(self, directory: str | Path, stem: str = "probe") -> dict[str, Path]:
        """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.png``; return their paths."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv"}
        write_text_atomic(paths["json"], json.dumps(self.to_dict(), indent=1))
        with atomic_path(paths["csv"]) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(_ROW_FIELDS))
            writer.writeheader()
            writer.writerows(row.as_dict() for row in self.rows)
        with atomic_path(out / f"{stem}.png") as tmp:
            self.plot(tmp)
        paths["png"] = out / f"{stem}.png"
        return paths

    def figure(self) -> Any:
        """The ``probe.png`` figure (a matplotlib ``Figure``; close it when done): one column
        per sweep (T1, T2, β for EP/AEP, r for holomorphic, N), the relative error vs the
        implicit gradient on top and the adjoint residual below (group ``all``); without
        sweeps, bars per parameter group. See ``gradstats.eqprop._plotting``."""
        from gradstats.eqprop._plotting import probe_figure

        return probe_figure(self.rows)

    def plot(self, path: str | Path) -> Path:
        """Write :meth:`figure` to ``path`` (the format its suffix names; PNG without one)."""
        from gradstats.eqprop._plotting import pyplot

        fig = self.figure()
        try:
            fig.savefig(path, dpi=100, format=Path(path).suffix.lstrip(".") or "png")
        finally:
            pyplot().close(fig)
        return Path(path)
