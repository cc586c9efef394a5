"""Obviously-correct references for ``gradstats.moments``: definitions written out, float64.

They trade speed for transparency: explicit weight vectors and direct sums, no streaming, no
merging. Tests pin the fast streaming classes to them; users can do the same with their data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["reference_ema", "reference_moments", "welford_loop"]


def reference_moments(
    x: torch.Tensor, weight: torch.Tensor | None = None, *, weights: str = "frequency"
) -> dict[str, torch.Tensor]:
    """Moments of the rows of ``x`` ([n, *shape]) from their definitions, in float64.

    Returns a dict with ``mean`` = Σwx/Σw, ``population_variance`` = Σw(x − mean)²/Σw,
    ``unbiased_variance`` (M2/(W − 1) for frequency weights, M2/(W − Σw²/W) for reliability
    weights), ``effective_sample_size`` (W, or W²/Σw²) and ``standard_error`` of the mean.
    """
    x = x.to(torch.float64)
    w = torch.ones(x.shape[0], dtype=torch.float64) if weight is None else weight.double()
    w = w.reshape((-1,) + (1,) * (x.dim() - 1))
    total = w.sum()
    mean = (w * x).sum(0) / total
    m2 = (w * (x - mean) ** 2).sum(0)
    if weights == "frequency":
        ess, denom = total, total - 1
    else:
        ess = total**2 / (w**2).sum()
        denom = total - (w**2).sum() / total
    unbiased = m2 / denom
    return {
        "mean": mean,
        "population_variance": m2 / total,
        "unbiased_variance": unbiased,
        "effective_sample_size": ess,
        "standard_error": (unbiased / ess).sqrt(),
    }


def welford_loop(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Welford's classic one-observation-at-a-time update (a Python loop over rows, float64).

    Returns ``count``, ``mean`` and ``m2`` (the sum of squared deviations).
    """
    x = x.to(torch.float64)
    mean = torch.zeros(x.shape[1:], dtype=torch.float64)
    m2 = torch.zeros_like(mean)
    for count, row in enumerate(x, start=1):
        delta = row - mean
        mean = mean + delta / count
        m2 = m2 + delta * (row - mean)
    return {"count": torch.tensor(float(x.shape[0]), dtype=torch.float64), "mean": mean, "m2": m2}


def reference_ema(xs: Sequence[torch.Tensor] | torch.Tensor, beta: float) -> dict:
    """Debiased EMA moments of the sequence ``xs`` from explicit weights, in float64.

    With t = len(xs) and w_k = (1 − β) β^(t−k) / (1 − β^t): ``mean`` = Σ w_k x_k,
    ``variance`` = Σ w_k (x_k − mean)², ``reliability`` ρ_w = Σ w_k², ``unbiased_variance`` =
    variance / (1 − ρ_w) (NaN for t = 1), ``effective_sample_size`` = 1/ρ_w.
    """
    x = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in xs])
    t = x.shape[0]
    k = torch.arange(1, t + 1, dtype=torch.float64)
    w = (1 - beta) * beta ** (t - k) / (1 - beta**t)
    w_x = w.reshape((-1,) + (1,) * (x.dim() - 1))
    mean = (w_x * x).sum(0)
    variance = (w_x * (x - mean) ** 2).sum(0)
    rho = (w**2).sum()
    unbiased = variance / (1 - rho) if t > 1 else torch.full_like(variance, float("nan"))
    return {
        "mean": mean,
        "variance": variance,
        "unbiased_variance": unbiased,
        "reliability": rho,
        "effective_sample_size": 1 / rho,
    }
