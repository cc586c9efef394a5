"""Nudged phases and their contrast: the engine of the EP-family estimators.

A nudge set {(β_k, w_k)} defines phases z_k relaxing under the nudged force

    F̃_k(z) = F(z) − c(z) − β_k ℓ(z),   c(z) = (J − Jᵀ)(z − anchor)  (AEP correction, optional)

with J the Jacobian of F at the anchor (``fixed``: the free state; ``tracking``: the common mode
z̄ = Σ_k w_k Re z_k, recomputed every step). All phases start at the free state z_ref.
The adjoint estimate and its residual are

    a   = −Re Σ_k w_k (z_k − z_ref)/β_k,
    r_a = −Re Σ_k w_k F̃_k(z_k)/β_k  ≈ Jᵀa + ℓ  (Ja + ℓ without the correction),

r_a using only forces the phases compute anyway. The phases stop per sample when
‖r_a‖/‖ℓ‖ ≤ ``tol_adjoint``; ``max_steps_adjoint`` is only a cap (it warns). The correction is
applied exactly as (J − Jᵀ)v, never clipped or rescaled (a factor α would give J − α(J − Jᵀ)).

Weights w_k sum to one over the *full* set; a complex β_k standing for itself and its conjugate
(real parameters: z_{β̄} = conj z_β) carries weight 2/N and contributes through Re.
"""

from __future__ import annotations

import cmath
import math
from dataclasses import dataclass

import torch

from gradstats._warnings import warn
from gradstats.eqprop._autodiff import Linearization, per_sample_norm
from gradstats.eqprop._iterate import iterate
from gradstats.eqprop._problem import Problem, complex_dtype_errors
from gradstats.eqprop._settings import Settings
from gradstats.eqprop._stats import SolveStats

__all__ = ["ALIASING_WARN", "AnalyticityWarning", "Nudge", "circle_nudges", "run_nudged"]


class AnalyticityWarning(RuntimeWarning):
    """The holomorphic radius r is near or beyond the analyticity radius R of β ↦ z_β."""


#: Warn when the estimated holomorphic aliasing error (r/R)^N reaches this.
ALIASING_WARN = 0.1


@dataclass(frozen=True)
class Nudge:
    """One nudged phase: strength ``beta`` (real or complex) and contrast weight ``weight``."""

    beta: complex | float
    weight: float

    @property
    def is_real(self) -> bool:
        return isinstance(self.beta, float)


def circle_nudges(radius: float, points: int) -> list[Nudge]:
    """β_k = r e^{2πik/N}, k = 0..⌊N/2⌋ (the others are conjugates): weights 1/N or 2/N."""
    nudges = []
    for k in range(points // 2 + 1):
        if k == 0:
            nudges.append(Nudge(float(radius), 1.0 / points))
        elif 2 * k == points:
            nudges.append(Nudge(-float(radius), 1.0 / points))
        else:
            nudges.append(Nudge(radius * cmath.exp(2j * math.pi * k / points), 2.0 / points))
    return nudges


def _total(terms: list[torch.Tensor]) -> torch.Tensor:
    """Σ terms (a tensor even for one term; ``sum()`` would start from the int 0)."""
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _radius_ratio(
    states: list[torch.Tensor], z_ref: torch.Tensor, radius: float, points: int
) -> torch.Tensor:
    """Estimate r/R per sample from the decay of the Fourier coefficients on the circle.

    With z_β − z_ref = Σ_m t_m β^m, the N-point coefficient c_m = (1/N) Σ_k (z_k − z_ref) β_k^{−m}
    is t_m up to aliasing, and ‖t_m‖ r^m ~ (r/R)^m; so q = (‖c_{N−1}‖ r^{N−1}/‖c_1‖ r)^{1/(N−2)}.
    The aliasing (relative) error of a is then about q^N.
    """
    full = []
    for k in range(points):
        j = k if k <= points // 2 else points - k
        z = states[j]
        full.append(z if k <= points // 2 or not z.is_complex() else z.conj())
    betas = [radius * cmath.exp(2j * math.pi * k / points) for k in range(points)]

    def coefficient(m: int) -> torch.Tensor:
        total = _total([(z - z_ref) * (b ** (-m)) for z, b in zip(full, betas, strict=True)])
        return per_sample_norm(total / points) * radius**m

    first, last = coefficient(1), coefficient(points - 1)
    ratio = (last / first.clamp_min(torch.finfo(first.dtype).tiny)) ** (1.0 / (points - 2))
    return torch.where(first > 0, ratio, torch.zeros_like(ratio))


def run_nudged(
    problem: Problem,
    z_ref: torch.Tensor,
    nudges: list[Nudge],
    *,
    correction: bool,
    anchor: str | None,
    settings: Settings,
    circle: tuple[float, int] | None = None,
) -> tuple[torch.Tensor, SolveStats]:
    """Relax the nudged phases from ``z_ref``; return the adjoint estimate a and the stats."""
    s = settings
    force = problem.force
    jvp_mode = problem.model.jvp_mode
    complex_dtype = _complex_dtype(z_ref.dtype)
    start = tuple(z_ref.clone() if n.is_real else z_ref.to(complex_dtype) for n in nudges)
    ell_ref = problem.loss_grad(z_ref)
    ell_norm = per_sample_norm(ell_ref).clamp_min(torch.finfo(z_ref.dtype).tiny)
    fixed = Linearization(force, z_ref, jvp_mode) if correction and anchor == "fixed" else None
    mirrored = (
        correction
        and anchor == "tracking"
        and len(nudges) == 2
        and all(n.is_real for n in nudges)
        and nudges[0].beta == -nudges[1].beta
        and nudges[0].weight == nudges[1].weight
    )

    def step(main, aux, check):
        if correction:
            if fixed is not None:
                lin, centre = fixed, z_ref
            else:
                centre = sum(n.weight * z.real for n, z in zip(nudges, main, strict=True))
                lin = Linearization(force, centre, jvp_mode)
        forces = []
        first_corr: torch.Tensor | None = None
        ells = problem.loss_grads(list(main))
        for k, (n, z) in enumerate(zip(nudges, main, strict=True)):
            f = force(z) - n.beta * ells[k]
            if correction:
                # mirrored: z_- − z̄ = −(z_+ − z̄), so one JVP/VJP pair serves both phases
                if mirrored and k == 1 and first_corr is not None:
                    corr = -first_corr
                else:
                    corr = lin.antisymmetric(z - centre)
                first_corr = corr if k == 0 else first_corr
                f = f - corr
            forces.append(f)
        proposal = tuple(z + s.step_size * f for z, f in zip(main, forces, strict=True))
        if not check:
            return proposal, aux, None, None
        weighted = (n.weight * (f / n.beta).real for n, f in zip(nudges, forces, strict=True))
        contrast = -sum(weighted, torch.zeros_like(ell_ref))
        res_abs = per_sample_norm(contrast)
        return proposal, aux, res_abs / ell_norm, res_abs

    hint = ""
    if circle is not None:
        hint = (
            "; for method='holomorphic' the radius r may be beyond the analyticity radius of "
            "β ↦ z_β: reduce beta"
        )
    complex_phases = any(not n.is_real for n in nudges)
    with torch.no_grad(), complex_dtype_errors(complex_phases, s.method, complex_dtype):
        states, _, stats = iterate(
            step,
            start,
            phase="nudged",
            kind="contrast" if len(nudges) > 1 else "one-sided",
            tol=s.tol_adjoint,
            max_steps=s.max_steps_adjoint,
            check_every=s.check_every,
            freeze=s.freeze,
            divergence_factor=s.divergence_factor,
            stall_checks=s.stall_checks,
            hint=hint,
        )
        a = -_total(
            [n.weight * ((z - z_ref) / n.beta).real for n, z in zip(nudges, states, strict=True)]
        )
        if circle is not None and circle[1] >= 3:
            ratio = _radius_ratio(list(states), z_ref, *circle)
            stats.extra["radius_ratio"] = ratio
            stats.extra["aliasing_error"] = ratio ** circle[1]
            worst = float(ratio.max())  # sync-ok: once per estimate
            if worst >= 1.0 or worst ** circle[1] >= ALIASING_WARN:
                warn(
                    f"holomorphic phases: the estimated r/R = {worst:.3g} (R: analyticity "
                    f"radius of β ↦ z_β; r = {circle[0]:g}, N = {circle[1]}) puts the aliasing "
                    f"error near {min(worst ** circle[1], 1.0):.2g}"
                    + (
                        "; r is beyond R, so more points N will not help — reduce beta (r)"
                        if worst >= 1.0
                        else "; reduce beta (r) or raise points (N)"
                    ),
                    AnalyticityWarning,
                )
    return a, stats
