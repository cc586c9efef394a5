r"""Aggregation of per-tensor statistics and the scaling factor, as device-vector functions.

Aggregate k (the whole model, one param group, or one tensor) has the ratio of sums over the
tensors that have a gradient this step and an estimate (tensors without gradients are left out,
never counted as zero):

    N_k = Σ_{j∈k} noise_j,   S_k = Σ_{j∈k} signal_j,   ρ_k = N_k / S_k,   c_k = rule(ρ_k)

(``rule="shrink"``: c_k = 1 / (1 + α ρ_k); ``"adascale"``: (1 + Sρ_k)/(1 + ρ_k); see ``_rules``).

States instead of divisions by eps: *no estimate* (fewer observations than the statistic needs:
c = 1), *no detectable signal* (S_k <= eps: ρ = ∞), *gated* (warm-up, or the
relative standard error of ρ above ``confidence``: c = 1; no detectable signal: the rule's
value at ρ = ∞). The relative standard error is the
count-based bound sqrt(2 / (n_eff − 1)) of a variance estimated from n_eff = 1/ρ_w effective
observations (the smallest n_eff among the aggregate's tensors), which ignores the averaging over
coordinates and so errs on the side of waiting. An optional rate limit
|log c_t − log c_{t−1}| <= max_rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradstats.moments import ema_reliability
from gradstats.scaling._rules import Rule

__all__ = ["Aggregates", "FactorSettings", "Factors", "aggregate", "scaling_factor"]

_NO_COUNT = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class Aggregates:
    """Per aggregate k (device vectors): N_k, S_k, the smallest count, the member count."""

    noise: torch.Tensor
    signal: torch.Tensor
    count: torch.Tensor
    members: torch.Tensor


@dataclass(frozen=True)
class Factors:
    """Per aggregate k (device vectors): ρ_k, the bounded factor before and after the gates and
    the rate limit, the gate states, the relative standard error of ρ and n_eff = 1/ρ_w."""

    rho: torch.Tensor
    raw_factor: torch.Tensor
    factor: torch.Tensor
    gate_open: torch.Tensor
    no_estimate: torch.Tensor
    no_signal: torch.Tensor
    rel_se: torch.Tensor
    effective_sample_size: torch.Tensor


@dataclass(frozen=True)
class FactorSettings:
    """The configuration :func:`scaling_factor` needs (besides the rate limit)."""

    rule: Rule
    beta: float
    eps: float
    confidence: float | None
    min_count: int
    warm: bool


def aggregate(
    noise: torch.Tensor,
    signal: torch.Tensor,
    count: torch.Tensor,
    include: torch.Tensor,
    group_index: torch.Tensor,
    groups: int,
) -> Aggregates:
    """Sum noise and signal over the included tensors of each aggregate; smallest count."""
    zeros = torch.zeros(groups, dtype=torch.float64, device=noise.device)
    members = zeros.index_add(0, group_index, include.to(torch.float64))
    smallest = torch.full((groups,), _NO_COUNT, dtype=torch.int64, device=noise.device)
    smallest = smallest.scatter_reduce(
        0, group_index, torch.where(include, count, _NO_COUNT), "amin"
    )
    return Aggregates(
        noise=zeros.index_add(0, group_index, torch.where(include, noise, 0.0)),
        signal=zeros.index_add(0, group_index, torch.where(include, signal, 0.0)),
        count=torch.where(members > 0, smallest, 0),
        members=members,
    )


def scaling_factor(
    totals: Aggregates,
    previous: torch.Tensor,
    settings: FactorSettings,
    *,
    max_rate: float | None,
) -> Factors:
    """The factor of every aggregate, with its ρ and gate states (all device vectors)."""
    noise, signal, count = totals.noise, totals.signal, totals.count
    beta, eps = settings.beta, settings.eps
    confidence, min_count = settings.confidence, settings.min_count
    has_signal = signal > eps
    # an unbiased noise estimate can come out negative (a small difference of norms): the
    # ratio is clamped at 0 (a noise-free gradient), so every rule sees ρ >= 0
    rho = torch.where(
        has_signal, noise.clamp(min=0.0) / torch.where(has_signal, signal, 1.0), math.inf
    )
    raw = settings.rule.factor(rho, previous)
    estimate = count >= min_count
    # x.reciprocal() * c is what c / x runs (Tensor.__rdiv__), without its Python wrapper
    effective = ema_reliability(beta, count).reciprocal()
    spread = effective - 1.0
    spreads = spread > 0
    rel_se = torch.where(
        spreads, torch.where(spreads, spread, 1.0).reciprocal().mul(2.0).sqrt(), math.inf
    )
    gate = estimate if settings.warm else torch.zeros_like(estimate)
    if confidence is not None:
        gate = gate & (rel_se <= confidence)
    factor = torch.where(gate, raw, 1.0)
    if max_rate is not None:
        factor = torch.minimum(
            torch.maximum(factor, previous * math.exp(-max_rate)), previous * math.exp(max_rate)
        )
    return Factors(
        rho=rho,
        raw_factor=raw,
        factor=factor,
        gate_open=gate,
        no_estimate=~estimate,
        no_signal=estimate & ~has_signal,
        rel_se=rel_se,
        effective_sample_size=torch.where(count > 0, effective, 0.0),
    )
