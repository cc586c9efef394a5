"""``diagnose``: name what limits each estimator in a probe report (spec §4).

Signatures, read from the ``all`` group of the sweeps:

* **truncation** — the error falls as T2 grows while the contrast/adjoint residual r_a falls, or
  a nudged/adjoint phase stopped at its cap; or (free phase) the error falls as T1 grows for an
  estimator without a fixed anchor, or only the gradient error falls (the adjoint is flat but the
  gradient is evaluated at an unconverged T1 state).
* **finite-nudge bias** — the error shrinks as β (or r) shrinks: slope ≈ 1 (one-sided),
  ≈ 2 (two-point), or geometrically in N (holomorphic).
* **residual asymmetry** — the error is flat in β (and in T2 where swept) and not small: plain EP
  on a non-symmetric Jacobian (the report's ``asymmetry`` = ‖Jv − Jᵀv‖/‖Jv‖ says how much).
* **anchor mismatch** — with a ``fixed`` anchor, the adjoint error ‖a − λ‖/‖λ‖ falls as T1 grows
  (the anchor is the unconverged free state); a ``tracking`` anchor does not show it.

One threshold rule, :data:`OK_ERROR` = 10⁻² on the relative error e = ‖g − g*‖/‖g*‖ against the
implicit gradient (e ≤ 10⁻² ⇒ cos ≥ 1 − e²/2 = 0.99995; a 1% error is far below a minibatch
gradient's own noise), applies to every verdict:

* a cause (truncation, finite-nudge bias, residual asymmetry, anchor mismatch) is named only where
  the error it explains exceeds :data:`OK_ERROR` — the largest error of the sweep that shows the
  signature, or the base error for evidence read from the base row alone. A holomorphic error of
  3·10⁻⁷ that still shrinks with r is *not* a finite-nudge bias: it is ok;
* **ok** — no cause found and the base error (the probe's own settings) is ≤ :data:`OK_ERROR`;
* **undetermined** — no cause found and the base error is > :data:`OK_ERROR` (an AEP error of
  2.5·10⁻² is never "ok", whatever its cosine): sweep T2, β and T1 to locate it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gradstats.eqprop._probe_report import ProbeReport, ProbeRow
from gradstats.errors import ConfigurationTypeError

__all__ = ["FINDINGS", "OK_ERROR", "Finding", "diagnose"]

FINDINGS = (
    "truncation",
    "finite-nudge bias",
    "residual asymmetry",
    "anchor mismatch",
    "ok",
    "undetermined",
)
#: The one threshold on a relative gradient error: at or below it an error is "ok" (see above).
OK_ERROR = 1e-2
_FLOOR = OK_ERROR


@dataclass(frozen=True)
class Finding:
    """One diagnosis: ``name`` (one of :data:`FINDINGS`), the method, and the evidence."""

    name: str
    method: str
    evidence: str

    def __str__(self) -> str:
        return f"{self.method}: {self.name} — {self.evidence}"


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx = [math.log(v) for v in xs]
    ly = [math.log(max(v, 1e-300)) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den if den else 0.0


def _series(report: ProbeReport, method: str, sweep: str) -> list[ProbeRow]:
    rows = [
        r
        for r in report.select(method=method, sweep=sweep, group="all")
        if not r.skipped and r.rel_err == r.rel_err and r.value is not None
    ]
    rows.sort(key=lambda r: r.value if r.value is not None else 0.0)
    return rows


def _values(rows: list[ProbeRow]) -> list[float]:
    return [r.value for r in rows if r.value is not None]


@dataclass(frozen=True)
class _Evidence:
    """What ``diagnose`` reads of one method: its base row and its sweeps (``all`` group)."""

    method: str
    base: ProbeRow | None
    t2: list[ProbeRow]
    beta: list[ProbeRow]
    points: list[ProbeRow]
    t1: list[ProbeRow]
    asymmetry: float


def _evidence(report: ProbeReport, method: str) -> _Evidence:
    bases = report.select(method=method, sweep=None, group="all")
    series = {name: _series(report, method, name) for name in ("T2", "beta", "points", "T1")}
    return _Evidence(
        method,
        bases[0] if bases else None,
        series["T2"],
        series["beta"],
        series["points"],
        series["T1"],
        report.asymmetry,
    )


_Found = list[tuple[str, str]]  # (finding name, evidence)


def _t2_flat(ev: _Evidence) -> bool:
    return len(ev.t2) < 2 or ev.t2[0].rel_err / max(ev.t2[-1].rel_err, 1e-300) < 1.5


def _beta_slope(ev: _Evidence) -> float:
    return _slope(_values(ev.beta), [r.rel_err for r in ev.beta])


def _truncation_in_t2(ev: _Evidence) -> _Found:
    t2, base = ev.t2, ev.base
    found: _Found = []
    if len(t2) >= 2:
        drop = t2[0].rel_err / max(t2[-1].rel_err, 1e-300)
        res = [r.res_adjoint for r in t2 if r.res_adjoint is not None]
        res_drop = res[0] / max(res[-1], 1e-300) if len(res) == len(t2) else 1.0
        if drop >= 2 and res_drop >= 2 and max(r.rel_err for r in t2) > OK_ERROR:
            found.append((
                "truncation",
                f"error falls {drop:.3g}x and r_a {res_drop:.3g}x as T2 goes "
                f"{t2[0].value} -> {t2[-1].value}",
            ))  # fmt: skip
    capped = base and base.converged_adjoint is False and base.rel_err > OK_ERROR
    if capped and base and base.res_adjoint is not None:
        found.append(
            ("truncation", f"the nudged/adjoint phase hit its cap (r_a {base.res_adjoint:.3g})")
        )
    return found


def _nudge_bias(ev: _Evidence) -> _Found:
    found: _Found = []
    if len(ev.beta) >= 2:
        xs, ys = _values(ev.beta), [r.rel_err for r in ev.beta]
        slope = _beta_slope(ev)
        if slope >= 0.5 and max(ys) / max(min(ys), 1e-300) >= 2 and max(ys) > OK_ERROR:
            found.append(
                ("finite-nudge bias", f"error ∝ β^{slope:.2f} over β in [{min(xs)}, {max(xs)}]")
            )
    if len(ev.points) >= 2:
        xs, ys = _values(ev.points), [r.rel_err for r in ev.points]
        lys = [math.log(max(v, 1e-300)) for v in ys]
        mx = sum(xs) / len(xs)
        den = sum((v - mx) ** 2 for v in xs)
        rate = sum((a - mx) * (b - sum(lys) / len(lys)) for a, b in zip(xs, lys, strict=True))
        rate = rate / den if den else 0.0
        if rate < -0.05 and ys[0] / max(ys[-1], 1e-300) >= 2 and max(ys) > OK_ERROR:
            found.append(
                ("finite-nudge bias", f"error ∝ q^N with q ≈ {math.exp(rate):.3g} (holomorphic)")
            )
    return found


def _asymmetry(ev: _Evidence) -> _Found:
    beta_flat = len(ev.beta) >= 2 and abs(_beta_slope(ev)) < 0.3
    if beta_flat and min(r.rel_err for r in ev.beta) > _FLOOR and _t2_flat(ev):
        return [(
            "residual asymmetry",
            f"error flat in β{' and T2' if ev.t2 else ''} at "
            f"{min(r.rel_err for r in ev.beta):.3g}; ‖Jv − Jᵀv‖/‖Jv‖ = {ev.asymmetry:.3g}",
        )]  # fmt: skip
    plain = ev.method in ("ep", "ep_symmetric") and not ev.beta and not ev.t2
    if plain and ev.base and ev.base.rel_err > _FLOOR and ev.asymmetry > _FLOOR:
        return [(
            "residual asymmetry",
            f"plain EP with ‖Jv − Jᵀv‖/‖Jv‖ = {ev.asymmetry:.3g} "
            f"(error {ev.base.rel_err:.3g}; sweep beta to confirm)",
        )]  # fmt: skip
    return []


def _free_phase(ev: _Evidence) -> _Found:
    t1 = ev.t1
    if len(t1) < 2:
        return []
    found: _Found = []
    drop = t1[0].rel_err / max(t1[-1].rel_err, 1e-300)
    adj = [r.adj_err for r in t1 if r.adj_err is not None]
    adj_drop = adj[0] / max(adj[-1], 1e-300) if len(adj) == len(t1) else drop
    fixed = t1[-1].anchor == "fixed"
    if max([r.rel_err for r in t1] + adj) <= OK_ERROR:
        adj_drop = drop = 1.0  # the T1 dependence explains no error above the threshold
    if adj_drop >= 2 and fixed:
        found.append((
            "anchor mismatch",
            f"the adjoint error falls {adj_drop:.3g}x as T1 grows with a fixed anchor "
            "(a tracking anchor removes it)",
        ))  # fmt: skip
    if drop >= 2 or (adj_drop >= 2 and not fixed):
        found.append((
            "truncation",
            f"free phase: the gradient error falls {drop:.3g}x and the adjoint error "
            f"{adj_drop:.3g}x as T1 goes {t1[0].value} -> {t1[-1].value} "
            "(the state at T1 is unconverged: raise T1 or tighten tol)",
        ))  # fmt: skip
    return found


def _verdict(base: ProbeRow) -> tuple[str, str]:
    """``ok`` or ``undetermined`` when no sweep shows a cause."""
    if base.rel_err <= OK_ERROR:
        return "ok", f"rel. error {base.rel_err:.3g} <= {OK_ERROR:g} (cos = {base.cos:.6f})"
    return (
        "undetermined",
        f"rel. error {base.rel_err:.3g} > {OK_ERROR:g} (cos = {base.cos:.6f}) and no "
        "sweep shows a cause; sweep T2, beta and T1 to locate it",
    )


_SIGNATURES = (_truncation_in_t2, _nudge_bias, _asymmetry, _free_phase)


def diagnose(report: ProbeReport) -> list[Finding]:
    """Findings for every method of ``report`` (at least one per method)."""
    if not isinstance(report, ProbeReport):
        raise ConfigurationTypeError(
            f"report must be a ProbeReport (from probe()); got {type(report).__name__}"
        )
    findings: list[Finding] = []
    for method in dict.fromkeys(r.method for r in report.rows):
        ev = _evidence(report, method)
        found = [item for signature in _SIGNATURES for item in signature(ev)]
        if not found and ev.base is not None:
            found = [_verdict(ev.base)]
        findings += [Finding(name, method, evidence) for name, evidence in found]
    return findings
