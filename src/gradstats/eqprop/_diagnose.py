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


def diagnose(report: ProbeReport) -> list[Finding]:
    """Findings for every method of ``report`` (at least one per method)."""
    if not isinstance(report, ProbeReport):
        raise ConfigurationTypeError(
            f"report must be a ProbeReport (from probe()); got {type(report).__name__}"
        )
    findings: list[Finding] = []
    for method in dict.fromkeys(r.method for r in report.rows):
        found: list[Finding] = []

        def add(
            name: str, evidence: str, method: str = method, found: list[Finding] = found
        ) -> None:
            found.append(Finding(name, method, evidence))

        bases = report.select(method=method, sweep=None, group="all")
        base = bases[0] if bases else None
        t2 = _series(report, method, "T2")
        t2_flat = True
        if len(t2) >= 2:
            drop = t2[0].rel_err / max(t2[-1].rel_err, 1e-300)
            res = [r.res_adjoint for r in t2 if r.res_adjoint is not None]
            res_drop = res[0] / max(res[-1], 1e-300) if len(res) == len(t2) else 1.0
            t2_flat = drop < 1.5
            if drop >= 2 and res_drop >= 2 and max(r.rel_err for r in t2) > OK_ERROR:
                add(
                    "truncation",
                    f"error falls {drop:.3g}x and r_a {res_drop:.3g}x as T2 goes "
                    f"{t2[0].value} -> {t2[-1].value}",
                )
        capped = base and base.converged_adjoint is False and base.rel_err > OK_ERROR
        if capped and base and base.res_adjoint is not None:
            add(
                "truncation",
                f"the nudged/adjoint phase hit its cap (r_a {base.res_adjoint:.3g})",
            )
        beta = _series(report, method, "beta")
        beta_flat = False
        if len(beta) >= 2:
            xs, ys = _values(beta), [r.rel_err for r in beta]
            slope = _slope(xs, ys)
            if slope >= 0.5 and max(ys) / max(min(ys), 1e-300) >= 2 and max(ys) > OK_ERROR:
                add("finite-nudge bias", f"error ∝ β^{slope:.2f} over β in [{min(xs)}, {max(xs)}]")
            beta_flat = abs(slope) < 0.3 and min(ys) > _FLOOR
        points = _series(report, method, "points")
        if len(points) >= 2:
            xs, ys = _values(points), [r.rel_err for r in points]
            lys = [math.log(max(v, 1e-300)) for v in ys]
            mx = sum(xs) / len(xs)
            den = sum((v - mx) ** 2 for v in xs)
            rate = sum((a - mx) * (b - sum(lys) / len(lys)) for a, b in zip(xs, lys, strict=True))
            rate = rate / den if den else 0.0
            if rate < -0.05 and ys[0] / max(ys[-1], 1e-300) >= 2 and max(ys) > OK_ERROR:
                add("finite-nudge bias", f"error ∝ q^N with q ≈ {math.exp(rate):.3g} (holomorphic)")
        if beta_flat and t2_flat:
            add(
                "residual asymmetry",
                f"error flat in β{' and T2' if t2 else ''} at {min(r.rel_err for r in beta):.3g}"
                f"; ‖Jv − Jᵀv‖/‖Jv‖ = {report.asymmetry:.3g}",
            )
        elif (
            not beta
            and not t2
            and method in ("ep", "ep_symmetric")
            and base
            and base.rel_err > _FLOOR
            and report.asymmetry > _FLOOR
        ):
            add(
                "residual asymmetry",
                f"plain EP with ‖Jv − Jᵀv‖/‖Jv‖ = {report.asymmetry:.3g} "
                f"(error {base.rel_err:.3g}; sweep beta to confirm)",
            )
        t1 = _series(report, method, "T1")
        if len(t1) >= 2:
            drop = t1[0].rel_err / max(t1[-1].rel_err, 1e-300)
            adj = [r.adj_err for r in t1 if r.adj_err is not None]
            adj_drop = adj[0] / max(adj[-1], 1e-300) if len(adj) == len(t1) else drop
            fixed = t1[-1].anchor == "fixed"
            worst = max([r.rel_err for r in t1] + adj)
            if worst <= OK_ERROR:
                adj_drop = drop = 1.0  # the T1 dependence explains no error above the threshold
            if adj_drop >= 2 and fixed:
                add(
                    "anchor mismatch",
                    f"the adjoint error falls {adj_drop:.3g}x as T1 grows with a fixed anchor "
                    "(a tracking anchor removes it)",
                )
            if drop >= 2 or (adj_drop >= 2 and not fixed):
                add(
                    "truncation",
                    f"free phase: the gradient error falls {drop:.3g}x and the adjoint error "
                    f"{adj_drop:.3g}x as T1 goes {t1[0].value} -> {t1[-1].value} "
                    "(the state at T1 is unconverged: raise T1 or tighten tol)",
                )
        if not found and base is not None:
            if base.rel_err <= OK_ERROR:
                add(
                    "ok",
                    f"rel. error {base.rel_err:.3g} <= {OK_ERROR:g} (cos = {base.cos:.6f})",
                )
            else:
                add(
                    "undetermined",
                    f"rel. error {base.rel_err:.3g} > {OK_ERROR:g} (cos = {base.cos:.6f}) and no "
                    "sweep shows a cause; sweep T2, beta and T1 to locate it",
                )
        findings.extend(found)
    return findings
