"""``holomorphic``: N nudges on a circle in the complex plane; error O((r/R)^N).

β_k = r e^{2πik/N}; each phase relaxes the complex-analytic extension of the (optionally
AEP-corrected) nudged force. a = −Re (1/N) Σ_k (z_{β_k} − z*)/β_k is the first Taylor coefficient
of β ↦ (z* − z_β) up to aliasing from the coefficients N, 2N, ...: with the correction it equals
λ + O((r/R)^N), R the analyticity radius (linear case: a_N = (I − r^N P^N)⁻¹λ, P = J⁻ᵀH).
For real parameters z_{β̄} = conj(z_β), so only ⌊N/2⌋ + 1 phases are relaxed (real β in real
arithmetic). With N ≥ 3 the decay of the other Fourier coefficients estimates r/R; a value ≥ 1
warns (``AnalyticityWarning``): more points will not help there.
"""

from __future__ import annotations

import torch

from gradstats.eqprop._estimators._phases import circle_nudges, run_nudged
from gradstats.eqprop._problem import Problem, free_phase
from gradstats.eqprop._settings import Settings, required
from gradstats.eqprop._stats import SolveStats

__all__ = ["holomorphic_adjoint"]


def holomorphic_adjoint(
    problem: Problem, s: Settings
) -> tuple[torch.Tensor, torch.Tensor, dict[str, SolveStats]]:
    """Return ``(z*, a, stats)``."""
    z, free = free_phase(problem, s)
    radius = required(s.beta, "beta", s.method)
    points = required(s.points, "points", s.method)
    a, nudged = run_nudged(
        problem,
        z,
        circle_nudges(radius, points),
        correction=required(s.correction, "correction", s.method),
        anchor=s.anchor,
        settings=s,
        circle=(radius, points),
    )
    return z, a, {"free": free, "nudged": nudged}
