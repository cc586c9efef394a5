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

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from gradstats._validation import check_choice, check_positive_int
from gradstats.eqprop._estimators._phases import circle_nudges, run_nudged
from gradstats.eqprop._estimators.aep import ANCHORS
from gradstats.eqprop._problem import Outcome, Problem, free_phase
from gradstats.eqprop._registry import T2_KEY, Estimator, Options
from gradstats.eqprop._settings import Settings, check_float, required
from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = ["HOLOMORPHIC", "HolomorphicOptions", "holomorphic_adjoint"]


@dataclass(frozen=True)
class HolomorphicOptions(Options):
    """Settings of holomorphic EP: radius r (``beta``), N (``points``), the AEP correction and
    its anchor (only with the correction)."""

    DEFAULTS: ClassVar[Mapping[str, object]] = MappingProxyType(
        {"points": 4, "anchor": "tracking", "correction": True}
    )
    beta: float | None = None
    points: int | None = None
    anchor: str | None = None
    correction: bool | None = None

    @classmethod
    def select(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(settings)
        if out.get("correction") is False:
            out.pop("anchor", None)  # the anchor only exists with the AEP correction
        return out

    @classmethod
    def resolve(
        cls, method: str, merged: Mapping[str, object], given: Mapping[str, object], max_steps: int
    ) -> HolomorphicOptions:
        beta = check_float("beta (the radius r for method='holomorphic')", merged["beta"])
        points = check_positive_int("points", merged["points"], minimum=2)
        correction = merged["correction"]
        if not isinstance(correction, bool):
            raise ConfigurationTypeError(
                f"correction must be a bool; got {type(correction).__name__}"
            )
        anchor = None
        if correction:
            anchor = check_choice("anchor", merged["anchor"], ANCHORS)
        elif "anchor" in given:
            raise ConfigurationError(
                "anchor applies only with correction=True (the AEP correction)"
            )
        return cls(beta=beta, points=points, anchor=anchor, correction=correction)


def holomorphic_adjoint(problem: Problem, s: Settings) -> Outcome:
    """Return ``(z*, a, stats)``."""
    z, free = free_phase(problem, s)
    options = s.options
    assert isinstance(options, HolomorphicOptions)
    radius = required(options.beta, "beta", s.method)
    points = required(options.points, "points", s.method)
    a, nudged = run_nudged(
        problem,
        z,
        circle_nudges(radius, points),
        correction=required(options.correction, "correction", s.method),
        anchor=options.anchor,
        settings=s,
        circle=(radius, points),
    )
    return Outcome(z, a, {"free": free, "nudged": nudged})


HOLOMORPHIC = Estimator(
    name="holomorphic",
    estimate="−Re (1/N) Σ_k (z_{β_k} − z*)/β_k",
    exact_when="holomorphic model; O((r/R)^N)",
    compute=holomorphic_adjoint,
    options=HolomorphicOptions,
    phases=("free", "nudged"),
    model_kinds=("holomorphic",),
    sweeps=("T2", "beta", "points", "T1"),
    t2_keys=(T2_KEY,),
    defaults={"beta": 0.1},
    train_rank=1,
)
