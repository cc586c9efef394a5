"""Shared small cases and measures for the eqprop tests (float64, fixed seeds)."""

from __future__ import annotations

import contextlib
import math

import torch

from gradstats.eqprop.models import HopfieldModel, LinearModel, TanhModel


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_case(kappa: float, seed: int = 0, n: int = 6, m: int = 3, p: int = 2, batch: int = 4):
    g = gen(seed)
    model = LinearModel.random(n, m, p, kappa, generator=g)
    return model, torch.randn(batch, m, generator=g), torch.randn(batch, p, generator=g)


def tanh_case(seed: int = 1, n: int = 8, m: int = 4, p: int = 3, batch: int = 5):
    g = gen(seed)
    model = TanhModel.random(n, m, p, generator=g)
    return model, torch.randn(batch, m, generator=g), torch.randn(batch, p, generator=g)


def hopfield_case(seed: int = 2, n: int = 8, m: int = 4, p: int = 3, batch: int = 5):
    g = gen(seed)
    model = HopfieldModel.random(n, m, p, generator=g)
    return model, torch.randn(batch, m, generator=g), torch.randn(batch, p, generator=g)


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[k].reshape(-1) for k in sorted(grads)])


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.reshape(-1) @ b.reshape(-1)) / (a.norm() * b.norm()))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def loglog_slope(xs, ys) -> float:
    lx = [math.log(v) for v in xs]
    ly = [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    num = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    return num / sum((a - mx) ** 2 for a in lx)


#: Tight settings for float64 reference comparisons.
TIGHT = {"tol": 1e-13, "tol_adjoint": 1e-12, "max_steps": 20000, "max_steps_adjoint": 20000}


class NoisyTanh(TanhModel):
    """F = −z + (m ⊙ tanh z) Wᵀ + Ux + b with a multiplicative noise m drawn per estimate."""

    def __init__(self, base: TanhModel, sigma: float = 0.3) -> None:
        super().__init__(base.W.data, base.U.data, base.b.data, base.C.data)
        self.sigma = sigma

    def sample_noise(self, x, generator):
        from gradstats.eqprop import NoiseRealization

        shape = (x.shape[0], self.W.shape[0])
        mask = 1 + self.sigma * torch.randn(shape, generator=generator, dtype=x.dtype)
        return NoiseRealization({"mask": mask})

    def force(self, z, x, noise=None):
        act = torch.tanh(z) if noise is None else noise["mask"].to(z.dtype) * torch.tanh(z)
        return -z + act @ self.W.to(z.dtype).T + x @ self.U.T + self.b.to(z.dtype)


class RandomInsideForce(TanhModel):
    """The original's hazard: fresh noise drawn inside the force on every call."""

    def force(self, z, x, noise=None):
        mask = 1 + 0.3 * torch.randn(z.shape, dtype=z.real.dtype)
        return -z + (mask * torch.tanh(z)) @ self.W.T + x @ self.U.T + self.b


@contextlib.contextmanager
def float64():
    """float64 default dtype inside module-scoped fixtures (restored afterwards)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
