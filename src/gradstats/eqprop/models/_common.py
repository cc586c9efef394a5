"""Small helpers shared by the reference models."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import nn

from gradstats.eqprop._module import EquilibriumModule

__all__ = ["TanhReadoutModel", "like", "random_orthogonal", "scaled", "squared_error"]


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


class TanhReadoutModel(EquilibriumModule):
    """The parameters and readout the tanh reference models share: recurrent weights W [n, n],
    input weights U [n, m], bias b [n], readout C [p, n]; state z [batch, n] starting at 0;
    L = ½‖Cz − y‖² summed over the batch. Subclasses define ``force`` (and ``random``'s W)."""

    holomorphic = True
    solver_defaults: Mapping[str, object] = MappingProxyType({"step_size": 0.5})

    def __init__(self, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor, C: torch.Tensor):
        super().__init__()
        self.W = nn.Parameter(W.clone())
        self.U = nn.Parameter(U.clone())
        self.b = nn.Parameter(b.clone())
        self.C = nn.Parameter(C.clone())

    @staticmethod
    def random_input_and_readout(
        n: int, m: int, p: int, generator: torch.Generator, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U ~ N(0, 1/m), b ~ N(0, 0.01), C ~ N(0, 1/n), drawn in that order."""
        u = torch.randn(n, m, generator=generator, dtype=dtype) / m**0.5
        b = 0.1 * torch.randn(n, generator=generator, dtype=dtype)
        c = torch.randn(p, n, generator=generator, dtype=dtype) / n**0.5
        return u, b, c

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.W.shape[0])

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return squared_error(z, self.C, y)
