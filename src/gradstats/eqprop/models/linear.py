"""The linear family of spec §6: F(z) = Az + Bx, L = ½‖Cz − y‖² (everything in closed form)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import nn

from gradstats.eqprop._module import EquilibriumModule
from gradstats.eqprop.models._common import like, scaled, squared_error

__all__ = ["LinearModel"]


class LinearModel(EquilibriumModule):
    """F(z) = Az + Bx with A = S + κK − I (S symmetric, K antisymmetric, ‖S‖₂ = ‖K‖₂ = 0.5).

    z* = −A⁻¹Bx, ℓ = Cᵀ(Cz* − y), λ = −A⁻ᵀℓ, dL/dA = Σ_b λ z*ᵀ, dL/dB = Σ_b λ xᵀ,
    dL/dC = Σ_b (Cz* − y) z*ᵀ. J = A everywhere; symmetric iff κ = 0. Holomorphic (linear).

    Args:
        A: ``[n, n]``, B: ``[n, m]``, C: ``[p, n]`` (copied into parameters).
    """

    holomorphic = True
    solver_defaults: Mapping[str, object] = MappingProxyType({"step_size": 0.5})

    def __init__(self, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.B = nn.Parameter(B.clone())
        self.C = nn.Parameter(C.clone())

    @classmethod
    def random(
        cls,
        n: int,
        m: int,
        p: int,
        kappa: float = 0.5,
        *,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float64,
    ) -> LinearModel:
        """A random instance with A = S + κK − I, ‖S‖₂ = ‖K‖₂ = 0.5."""
        g = generator
        s = torch.randn(n, n, generator=g, dtype=dtype)
        k = torch.randn(n, n, generator=g, dtype=dtype)
        sym, anti = scaled(s + s.T, 0.5), scaled(k - k.T, 0.5)
        a = sym + kappa * anti - torch.eye(n, dtype=dtype)
        b = torch.randn(n, m, generator=g, dtype=dtype) / m**0.5
        c = torch.randn(p, n, generator=g, dtype=dtype) / n**0.5
        return cls(a, b, c)

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.A.shape[0])

    def force(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ like(self.A, z).T + x @ self.B.T

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return squared_error(z, self.C, y)
