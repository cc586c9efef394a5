"""A non-symmetric tanh network: F = −z + W tanh z + Ux + b (plain EP is biased for it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from gradstats.eqprop._module import EquilibriumModule
from gradstats.eqprop.models._common import like, scaled, squared_error

__all__ = ["TanhModel"]


class TanhModel(EquilibriumModule):
    """F(z) = −z + W tanh(z) + Ux + b, L = ½‖Cz − y‖² (summed over the batch).

    J = −I + W diag(sech² z) is not symmetric for a general W, so ``ep``/``ep_symmetric`` are
    biased (their error does not vanish as β → 0) while ``aep`` and ``holomorphic`` are not.
    With ‖W‖₂ < 1 the fixed point is unique and z ← z + εF(z) converges for ε ≤ 1.
    tanh has poles at ±iπ/2, which bound the analyticity radius of β ↦ z_β.
    """

    holomorphic = True
    solver_defaults: ClassVar[Mapping[str, object]] = {"step_size": 0.5}

    def __init__(self, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor, C: torch.Tensor):
        super().__init__()
        self.W = nn.Parameter(W.clone())
        self.U = nn.Parameter(U.clone())
        self.b = nn.Parameter(b.clone())
        self.C = nn.Parameter(C.clone())

    @classmethod
    def random(
        cls,
        n: int,
        m: int,
        p: int,
        gain: float = 0.8,
        *,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float64,
    ) -> TanhModel:
        """W with spectral norm ``gain`` (non-symmetric), U, b, C Gaussian."""
        g = generator
        w = scaled(torch.randn(n, n, generator=g, dtype=dtype), gain)
        u = torch.randn(n, m, generator=g, dtype=dtype) / m**0.5
        b = 0.1 * torch.randn(n, generator=g, dtype=dtype)
        c = torch.randn(p, n, generator=g, dtype=dtype) / n**0.5
        return cls(w, u, b, c)

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.W.shape[0])

    def force(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -z + torch.tanh(z) @ like(self.W, z).T + x @ self.U.T + like(self.b, z)

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return squared_error(z, self.C, y)
