r"""What each ``kind`` estimates, and the backward passes that estimate it from one batch.

With per-unit loss l_i = −log p(y_i | x_i), sum-reduced over the unit's targets, and
g_i = ∇_θ l_i, every estimand is a weighted sum of per-unit squares x_ij = Σ_k w_k g_ikj² over
the passes k of a batch (Σ_k w_k = 1), divided by the number N of units:

* ``empirical``: one pass at the data labels: EF_jj = (1/N) Σ_i g_ij².
* ``mc``: K = ``mc_samples`` passes, labels y_ik ~ p_θ(·|x_i), weights 1/K — unbiased for F.
* ``exact``: one pass per output direction (label enumeration), the expectation over labels in
  closed form: F_jj = (1/N) Σ_i diag(J_iᵀ Λ_i J_i)_j (or the output layer's closed form).
* ``batch_grad_sq``: the mistaken (1/#batches) Σ_B (ḡ_B)², observations are batches; its
  expectation μ² + σ²/m depends on the batch size m. Never a Fisher, never a default.

An :class:`Estimand` declares its formula and what it needs (targets, modes, a mean gradient)
and yields a batch's passes as ``(objective, direction, weight)``: ``objective`` a scalar loss to
differentiate (or None), ``direction`` a cotangent for the model output (or None).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gradstats.errors import ConfigurationError
from gradstats.fisher._likelihood_base import Likelihood, Prepared

__all__ = ["ESTIMANDS", "KINDS", "Estimand", "Pass", "estimand"]

Pass = tuple[torch.Tensor | None, torch.Tensor | None, float]  # objective, direction, weight


@dataclass(frozen=True)
class Estimand:
    """One ``kind``: its formula and capabilities (attributes), and its backward passes."""

    kind: str
    formula: str
    needs_targets: bool = False  # scored at the data labels
    per_unit: bool = True  # per-unit squares from the hooks (False: batches are the units)
    has_signal: bool = False  # a mean gradient ḡ (so EF = ḡ² + Var) is available
    modes: tuple[str, ...] = ("cumulative", "ema")
    element_se: bool = False  # elementwise standard errors can be accumulated
    sampled: bool = False  # draws labels (``mc_samples``, ``generator``)
    closed_form: bool = False  # the output layer's Fisher has a closed form
    is_fisher: bool = True  # an estimate of a Fisher (consumers refuse the others)

    def passes(
        self,
        likelihood: Likelihood,
        prepared: Prepared,
        *,
        mc_samples: int,
        generator: torch.Generator | None,
        max_passes: int,
    ) -> tuple[int, Iterator[Pass]]:
        """(number of passes, the passes) of one batch."""
        raise NotImplementedError


class _Empirical(Estimand):
    def passes(self, likelihood, prepared, *, mc_samples, generator, max_passes):
        return 1, iter([(likelihood.loss(prepared, prepared.targets), None, 1.0)])


class _MonteCarlo(Estimand):
    def passes(self, likelihood, prepared, *, mc_samples, generator, max_passes):
        if generator is None:
            raise ConfigurationError("kind='mc' needs a torch.Generator to draw labels")
        weight = 1.0 / mc_samples
        return mc_samples, (
            (likelihood.loss(prepared, likelihood.sample(prepared, generator)), None, weight)
            for _ in range(mc_samples)
        )


class _Exact(Estimand):
    def passes(self, likelihood, prepared, *, mc_samples, generator, max_passes):
        count = likelihood.exact_passes(prepared)
        if count > max_passes:
            raise ConfigurationError(
                f"kind='exact' needs {count} backward passes for this batch (label "
                f"enumeration), more than max_exact_passes={max_passes}; use "
                "kind='mc' or collect only the output layer, without per-unit group "
                "families for it (closed form)"
            )
        return count, ((None, d, 1.0) for d in likelihood.exact_directions(prepared))


_REGISTRY: dict[str, Estimand] = {
    e.kind: e
    for e in (
        _Empirical(
            "empirical",
            "EF_jj = (1/N) Σ_i g_ij² at the data labels",
            needs_targets=True,
            has_signal=True,
            element_se=True,
        ),
        _MonteCarlo(
            "mc",
            "F_jj ≈ (1/N) Σ_i (1/K) Σ_k g_ikj², labels y_ik ~ p_θ(·|x_i)",
            has_signal=True,
            sampled=True,
        ),
        _Exact(
            "exact",
            "F_jj = (1/N) Σ_i diag(J_iᵀ Λ_i J_i)_j (expectation over labels in closed form)",
            closed_form=True,
        ),
        _Empirical(  # one pass at the data labels too, but of the batch-mean loss
            "batch_grad_sq",
            "(1/#batches) Σ_B (ḡ_B)_j²: mistaken, E = μ² + σ²/m, not the Fisher",
            needs_targets=True,
            per_unit=False,
            modes=("cumulative",),
            is_fisher=False,
        ),
    )
}

#: The kinds, in the order error messages list them.
KINDS = tuple(_REGISTRY)
#: kind -> the formula it estimates (stored in every result's spec as ``"estimand"``).
ESTIMANDS = {kind: e.formula for kind, e in _REGISTRY.items()}


def estimand(kind: str) -> Estimand:
    """The estimand of a (valid) ``kind``."""
    return _REGISTRY[kind]
