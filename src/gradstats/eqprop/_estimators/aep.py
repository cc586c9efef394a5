"""``aep``: asymmetric equilibrium propagation, exact for any Jacobian up to O(β²).

The two phases relax under F̃_{±β}(z) = F(z) − (J − Jᵀ)(z − anchor) ∓ β∇L(z): near the anchor the
corrected force has Jacobian Jᵀ, so a = (z_{−β} − z_{+β})/(2β) = −½[(Jᵀ+βH)⁻¹ + (Jᵀ−βH)⁻¹]ℓ
= λ + O(β²) (H = ∇²L). Anchor ``fixed``: the free state (J linearised once); ``tracking``: the
common mode z̄ = (z₊ + z₋)/2 each step, which converges to the true fixed point even when the
free phase stopped early, so the estimate does not inherit the free phase's error.
"""

from __future__ import annotations

import torch

from gradstats.eqprop._estimators._phases import Nudge, run_nudged
from gradstats.eqprop._problem import Problem, free_phase
from gradstats.eqprop._settings import Settings, required
from gradstats.eqprop._stats import SolveStats

__all__ = ["aep_adjoint"]


def aep_adjoint(
    problem: Problem, s: Settings
) -> tuple[torch.Tensor, torch.Tensor, dict[str, SolveStats]]:
    """Return ``(z*, a, stats)``."""
    z, free = free_phase(problem, s)
    beta = required(s.beta, "beta", s.method)
    nudges = [Nudge(beta, 0.5), Nudge(-beta, 0.5)]
    a, nudged = run_nudged(problem, z, nudges, correction=True, anchor=s.anchor, settings=s)
    return z, a, {"free": free, "nudged": nudged}
