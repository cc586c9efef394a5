"""``ep`` and ``ep_symmetric``: plain equilibrium propagation (no asymmetry correction).

* ``ep`` (one-sided): a = (z* − z_β)/β with z_β relaxed under F_β = F − β∇L from z*. As β → 0,
  a → −J⁻¹ℓ, which is the adjoint λ = −J⁻ᵀℓ only when J is symmetric; bias O(β).
* ``ep_symmetric``: a = (z_{−β} − z_{+β})/(2β); the same limit, bias O(β²).

The nudged phases stop on the contrast residual (see ``_phases``).
"""

from __future__ import annotations

import torch

from gradstats.eqprop._estimators._phases import Nudge, run_nudged
from gradstats.eqprop._problem import Problem, free_phase
from gradstats.eqprop._settings import Settings, required
from gradstats.eqprop._stats import SolveStats

__all__ = ["ep_adjoint"]


def ep_adjoint(
    problem: Problem, s: Settings
) -> tuple[torch.Tensor, torch.Tensor, dict[str, SolveStats]]:
    """Return ``(z*, a, stats)`` for ``s.method`` in ``("ep", "ep_symmetric")``."""
    z, free = free_phase(problem, s)
    beta = required(s.beta, "beta", s.method)
    one_sided = [Nudge(beta, 1.0)]
    nudges = one_sided if s.method == "ep" else [Nudge(beta, 0.5), Nudge(-beta, 0.5)]
    a, nudged = run_nudged(problem, z, nudges, correction=False, anchor=None, settings=s)
    return z, a, {"free": free, "nudged": nudged}
