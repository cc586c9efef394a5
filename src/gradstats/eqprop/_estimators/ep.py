"""``ep`` and ``ep_symmetric``: plain equilibrium propagation (no asymmetry correction).

* ``ep`` (one-sided): a = (z* − z_β)/β with z_β relaxed under F_β = F − β∇L from z*. As β → 0,
  a → −J⁻¹ℓ, which is the adjoint λ = −J⁻ᵀℓ only when J is symmetric; bias O(β).
* ``ep_symmetric``: a = (z_{−β} − z_{+β})/(2β); the same limit, bias O(β²).

The nudged phases stop on the contrast residual (see ``_phases``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gradstats.eqprop._estimators._phases import Nudge, run_nudged
from gradstats.eqprop._problem import Outcome, Problem, free_phase
from gradstats.eqprop._registry import T2_KEY, Estimator, Options
from gradstats.eqprop._settings import Settings, check_float, required

__all__ = ["EP", "EP_SYMMETRIC", "NudgeOptions", "ep_adjoint"]


@dataclass(frozen=True)
class NudgeOptions(Options):
    """Settings of plain EP: the nudge strength β."""

    beta: float | None = None

    @classmethod
    def resolve(
        cls, method: str, merged: Mapping[str, object], given: Mapping[str, object], max_steps: int
    ) -> NudgeOptions:
        return cls(beta=check_float("beta", merged["beta"]))


def ep_adjoint(problem: Problem, s: Settings) -> Outcome:
    """Return ``(z*, a, stats)`` for ``s.method`` in ``("ep", "ep_symmetric")``."""
    z, free = free_phase(problem, s)
    options = s.options
    assert isinstance(options, NudgeOptions)
    beta = required(options.beta, "beta", s.method)
    one_sided = [Nudge(beta, 1.0)]
    nudges = one_sided if s.method == "ep" else [Nudge(beta, 0.5), Nudge(-beta, 0.5)]
    a, nudged = run_nudged(problem, z, nudges, correction=False, anchor=None, settings=s)
    return Outcome(z, a, {"free": free, "nudged": nudged})


EP = Estimator(
    name="ep",
    estimate="(z* − z_β)/β",
    exact_when="J symmetric; bias O(β)",
    compute=ep_adjoint,
    options=NudgeOptions,
    phases=("free", "nudged"),
    sweeps=("T2", "beta", "T1"),
    t2_keys=(T2_KEY,),
    defaults={"beta": 0.01},
)
EP_SYMMETRIC = Estimator(
    name="ep_symmetric",
    estimate="(z_{−β} − z_{+β})/(2β)",
    exact_when="J symmetric; bias O(β²)",
    compute=ep_adjoint,
    options=NudgeOptions,
    phases=("free", "nudged"),
    sweeps=("T2", "beta", "T1"),
    t2_keys=(T2_KEY,),
    defaults={"beta": 0.05},
    train_rank=2,
)
