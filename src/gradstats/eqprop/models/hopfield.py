"""A Hopfield energy model (symmetric Jacobian): F = −∇E."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from gradstats.eqprop._module import EquilibriumModule
from gradstats.eqprop.models._common import like, scaled, squared_error

__all__ = ["HopfieldModel"]


class HopfieldModel(EquilibriumModule):
    """E(z) = ½‖z‖² − ½ ρᵀWρ − ρᵀ(Ux + b), ρ = tanh z, F = −∇E = −z + ρ' ⊙ (Wρ + Ux + b).

    W enters symmetrised (½(W + Wᵀ)), so J = ∂F/∂z = −∇²E is symmetric at every z and plain EP
    is unbiased up to O(β) (one-sided) or O(β²) (symmetric); AEP's correction vanishes.
    tanh is analytic for |Im z| < π/2, so the model is holomorphic near the real axis.
    Loss: ½‖Cz − y‖² summed over the batch.
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
        coupling: float = 0.5,
        *,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float64,
    ) -> HopfieldModel:
        g = generator
        w = torch.randn(n, n, generator=g, dtype=dtype)
        w = scaled(w + w.T, coupling)
        u = torch.randn(n, m, generator=g, dtype=dtype) / m**0.5
        b = 0.1 * torch.randn(n, generator=g, dtype=dtype)
        c = torch.randn(p, n, generator=g, dtype=dtype) / n**0.5
        return cls(w, u, b, c)

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.W.shape[0])

    def force(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        rho = torch.tanh(z)
        w = like(0.5 * (self.W + self.W.T), z)
        drive = rho @ w + x @ self.U.T + like(self.b, z)
        return -z + (1 - rho * rho) * drive

    def energy(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """E(z) summed over the batch (F = −∂E/∂z)."""
        rho = torch.tanh(z)
        w = 0.5 * (self.W + self.W.T)
        return (
            0.5 * (z * z).sum()
            - 0.5 * ((rho @ w) * rho).sum()
            - (rho * (x @ self.U.T + self.b)).sum()
        )

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return squared_error(z, self.C, y)
