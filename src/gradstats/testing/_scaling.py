"""Obviously-correct references for ``gradstats.scaling``: every statistic from a stored gradient
history with explicit EMA weights, in float64, and the two-batch estimator from its definition."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["reference_scaler_statistics", "reference_two_batch"]


def reference_scaler_statistics(history: Sequence[torch.Tensor], beta: float) -> dict[str, float]:
    """All scaler statistics of one tensor whose gradients were ``history`` (oldest first).

    With t = len(history), w_k = (1 − β)β^(t−k)/(1 − β^t), ρ_w = Σ w_k², g_k flattened to N
    coordinates and μ_k = mean_i g_k,i:

    * ``temporal_variance`` = mean_i Σ_k w_k (g_k,i − m_i)² with m = Σ_k w_k g_k (population)
    * ``temporal_noise`` = Σ_i v_i / (1 − ρ_w);  ``temporal_signal`` = Σ_i m_i² − ρ_w · noise
    * ``tensor_mean`` = Σ_k w_k (μ_k − Σ_j w_j μ_j)²
    * ``spatial`` = Σ_k w_k Var_i(g_k)  (population variance over coordinates)
    * ``mixed`` = Σ_k w_k mean_i(g_k,i²) − (Σ_k w_k μ_k)²
    * ``spread_of_mean`` = Var_i(m_i);  ``reliability`` = ρ_w.
    """
    g = torch.stack([torch.as_tensor(h, dtype=torch.float64).reshape(-1) for h in history])
    t = g.shape[0]
    k = torch.arange(1, t + 1, dtype=torch.float64)
    w = (1 - beta) * beta ** (t - k) / (1 - beta**t)
    rho = float((w**2).sum())
    m = (w[:, None] * g).sum(0)
    v = (w[:, None] * (g - m) ** 2).sum(0)
    mu = g.mean(1)
    mu_bar = (w * mu).sum()
    noise = float(v.sum()) / (1 - rho) if t > 1 else float("nan")
    return {
        "temporal_variance": float(v.mean()),
        "temporal_noise": noise,
        "temporal_signal": float((m**2).sum()) - rho * noise,
        "tensor_mean": float((w * (mu - mu_bar) ** 2).sum()),
        "spatial": float((w * g.var(1, unbiased=False)).sum()),
        "mixed": float((w * (g**2).mean(1)).sum() - mu_bar**2),
        "spread_of_mean": float(m.var(unbiased=False)),
        "reliability": rho,
    }


def reference_two_batch(small: Sequence[torch.Tensor]) -> dict[str, float]:
    """Two-batch estimates from K equal-size small-batch gradients of one step.

    g_b = mean_k g_k, A = mean_k ‖g_k‖², B = ‖g_b‖²: ``noise`` = (A − B)/(K − 1) estimates
    tr Cov(g_b) and ``signal`` = (K·B − A)/(K − 1) estimates ‖E g‖² (both unbiased).
    """
    g = torch.stack([torch.as_tensor(s, dtype=torch.float64).reshape(-1) for s in small])
    count = g.shape[0]
    a = float((g**2).sum(1).mean())
    b = float((g.mean(0) ** 2).sum())
    return {"noise": (a - b) / (count - 1), "signal": (count * b - a) / (count - 1)}
