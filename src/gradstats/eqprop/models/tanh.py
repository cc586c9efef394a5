"""A non-symmetric tanh network: F = −z + W tanh z + Ux + b (plain EP is biased for it)."""

from __future__ import annotations

import torch

from gradstats.eqprop.models._common import TanhReadoutModel, like, scaled

__all__ = ["TanhModel"]


class TanhModel(TanhReadoutModel):
    """F(z) = −z + W tanh(z) + Ux + b, L = ½‖Cz − y‖² (summed over the batch).

    J = −I + W diag(sech² z) is not symmetric for a general W, so ``ep``/``ep_symmetric`` are
    biased (their error does not vanish as β → 0) while ``aep`` and ``holomorphic`` are not.
    With ‖W‖₂ < 1 the fixed point is unique and z ← z + εF(z) converges for ε ≤ 1.
    tanh has poles at ±iπ/2, which bound the analyticity radius of β ↦ z_β.
    """

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
        return cls(w, *cls.random_input_and_readout(n, m, p, g, dtype))

    def force(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -z + torch.tanh(z) @ like(self.W, z).T + x @ self.U.T + like(self.b, z)
