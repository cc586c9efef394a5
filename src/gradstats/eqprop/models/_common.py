"""Small helpers shared by the reference models."""

from __future__ import annotations

import torch

__all__ = ["like", "random_orthogonal", "scaled", "squared_error"]


def like(w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``w`` cast to the (possibly complex) dtype of the state ``z`` (differentiably)."""
    return w.to(z.dtype) if z.dtype != w.dtype else w


def scaled(m: torch.Tensor, norm: float) -> torch.Tensor:
    """``m`` rescaled to spectral norm ``norm``."""
    return m * (norm / torch.linalg.matrix_norm(m, ord=2))


def random_orthogonal(n: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=dtype))
    return q


def squared_error(z: torch.Tensor, readout: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """½ Σ (z Cᵀ − y)², summed over the batch; squares (not |·|²), so holomorphic in z."""
    r = z @ like(readout, z).T - y
    return 0.5 * (r * r).sum()
