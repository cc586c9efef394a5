"""``aep``: asymmetric equilibrium propagation, exact for any Jacobian up to O(β²).

The two phases relax under F̃_{±β}(z) = F(z) − (J − Jᵀ)(z − anchor) ∓ β∇L(z): near the anchor the
corrected force has Jacobian Jᵀ, so a = (z_{−β} − z_{+β})/(2β) = −½[(Jᵀ+βH)⁻¹ + (Jᵀ−βH)⁻¹]ℓ
= λ + O(β²) (H = ∇²L). Anchor ``fixed``: the free state (J linearised once); ``tracking``: the
common mode z̄ = (z₊ + z₋)/2 each step, which converges to the true fixed point even when the
free phase stopped early, so the estimate does not inherit the free phase's error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

from gradstats._validation import check_choice
from gradstats.eqprop._estimators._phases import Nudge, run_nudged
from gradstats.eqprop._problem import Outcome, Problem, free_phase
from gradstats.eqprop._registry import T2_KEY, Estimator, Options
from gradstats.eqprop._settings import Settings, check_float, required

__all__ = ["AEP", "ANCHORS", "AEPOptions", "aep_adjoint"]

#: Anchors of the AEP correction: the free state, or the phases' common mode each step.
ANCHORS = ("fixed", "tracking")


@dataclass(frozen=True)
class AEPOptions(Options):
    """Settings of AEP: the nudge β and the anchor of the correction."""

    DEFAULTS: ClassVar[Mapping[str, object]] = MappingProxyType({"anchor": "tracking"})
    beta: float | None = None
    anchor: str | None = None

    @classmethod
    def resolve(
        cls, method: str, merged: Mapping[str, object], given: Mapping[str, object], max_steps: int
    ) -> AEPOptions:
        beta = check_float("beta", merged["beta"])
        return cls(beta=beta, anchor=check_choice("anchor", merged["anchor"], ANCHORS))


def aep_adjoint(problem: Problem, s: Settings) -> Outcome:
    """Return ``(z*, a, stats)``."""
    z, free = free_phase(problem, s)
    options = s.options
    assert isinstance(options, AEPOptions)
    beta = required(options.beta, "beta", s.method)
    nudges = [Nudge(beta, 0.5), Nudge(-beta, 0.5)]
    a, nudged = run_nudged(problem, z, nudges, correction=True, anchor=options.anchor, settings=s)
    return Outcome(z, a, {"free": free, "nudged": nudged})


AEP = Estimator(
    name="aep",
    estimate="symmetric contrast under F − (J − Jᵀ)v − β∇L",
    exact_when="any J; bias O(β²)",
    compute=aep_adjoint,
    options=AEPOptions,
    phases=("free", "nudged"),
    sweeps=("T2", "beta", "T1"),
    t2_keys=(T2_KEY,),
    defaults={"beta": 0.05},
    train_rank=0,
)
