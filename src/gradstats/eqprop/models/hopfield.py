"""A Hopfield energy model (symmetric Jacobian): F = −∇E."""

from __future__ import annotations

import torch

from gradstats.eqprop.models._common import TanhReadoutModel, like, scaled

__all__ = ["HopfieldModel"]


class HopfieldModel(TanhReadoutModel):
    """E(z) = ½‖z‖² − ½ ρᵀWρ − ρᵀ(Ux + b), ρ = tanh z, F = −∇E = −z + ρ' ⊙ (Wρ + Ux + b).

    W enters symmetrised (½(W + Wᵀ)), so J = ∂F/∂z = −∇²E is symmetric at every z and plain EP
    is unbiased up to O(β) (one-sided) or O(β²) (symmetric); AEP's correction vanishes.
    tanh is analytic for |Im z| < π/2, so the model is holomorphic near the real axis.
    Loss: ½‖Cz − y‖² summed over the batch.
    """

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
        return cls(w, *cls.random_input_and_readout(n, m, p, g, dtype))

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
