r"""The legacy statistics of the original scaler, kept as labelled diagnostics.

None of them measures gradient noise. They are exact, so they can be compared with ``temporal``
on the same run. With μ_t = mean_i g_t,i (the tensor mean at step t) and the EMA weights w_k:

* ``tensor_mean`` (original v3.0): Var_w(μ) = Σ_k w_k (μ_k − Σ_k w_k μ_k)² = 1ᵀC1 / N²:
  the noise along the all-ones direction only (two coordinates moving in opposite directions
  cancel: ``[0, 2]`` then ``[2, 0]`` gives 0).
* ``spatial`` (original v1/v2): Σ_k w_k Var_i(g_k), the EMA of the spread of a gradient's
  elements at each step (heterogeneity across elements, not noise).
* ``mixed`` (original v3.1/v3.2): Σ_k w_k mean_i(g_k,i²) − (Σ_k w_k μ_k)², which equals
  ``spatial`` + ``tensor_mean`` exactly, and also ``temporal`` (population, per coordinate mean)
  + Var_i(m): noise **plus** the spatial spread of the mean gradient (a constant gradient
  ``linspace(-1, 1, 100)`` gives 0.3400673400673401 where the true noise is 0).

For the factor, a diagnostic's ρ is its value divided by the unbiased squared tensor mean
(Σ_k w_k μ_k)² − ρ_w · Var_w(μ)/(1 − ρ_w), as the originals normalised by a squared tensor mean.
Tensors with no elements have no tensor mean and are left out.
"""

from __future__ import annotations

import torch

from gradstats.moments import ema_reliability, ema_step_size
from gradstats.scaling._state import ScalarTensorState, Totals, reliability_corrected

__all__ = ["DIAGNOSTICS", "DiagnosticState"]

DIAGNOSTICS = ("tensor_mean", "mixed", "spatial")


class DiagnosticState(ScalarTensorState):
    """Scalar-per-tensor state shared by the three diagnostics (all vectors on one device)."""

    min_count = 2
    _KEYS = ("count", "mu_mean", "mu_var", "spatial")

    def __init__(self, params: list[torch.Tensor], beta: float, statistic: str) -> None:
        self.statistic, self.beta = statistic, beta
        device = params[0].device if params else torch.device("cpu")
        zeros = torch.zeros(len(params), dtype=torch.float64, device=device)
        self.numel = torch.tensor([p.numel() for p in params], dtype=torch.float64, device=device)
        self.count = torch.zeros(len(params), dtype=torch.int64, device=device)
        self.mu_mean, self.mu_var, self.spatial = zeros, zeros.clone(), zeros.clone()

    def update(
        self,
        grads: list[torch.Tensor | None],
        sq_norms: torch.Tensor,
        take: torch.Tensor,
        *,
        grad_inv: torch.Tensor | None = None,
        hook_inv: torch.Tensor | None = None,
    ) -> None:
        take = take & (self.numel > 0)
        self.count = self.count + take.to(torch.int64)
        step = torch.where(take, ema_step_size(self.beta, self.count), 0.0)
        zero = torch.zeros(2, dtype=torch.float64, device=self.count.device)
        moments = torch.stack(
            [
                zero
                if g is None or g.numel() == 0
                else torch.stack(torch.var_mean(g.to(torch.float64), correction=0))
                for g in grads
            ]
        )  # per tensor: (Var_i g, mean_i g), two-pass
        if grad_inv is not None:  # .grad still carries an AMP loss scale S
            inv = grad_inv.to(device=moments.device, dtype=torch.float64)
            moments = moments * torch.stack([inv.square(), inv])
        mu = torch.where(take, moments[:, 1], self.mu_mean)  # NaN never enters
        spread = torch.where(take, moments[:, 0], self.spatial)
        delta = mu - self.mu_mean
        self.mu_mean = self.mu_mean + step * delta
        self.mu_var = (1.0 - step) * (self.mu_var + step * delta.square())
        self.spatial = self.spatial + step * (spread - self.spatial)

    def totals(self) -> Totals:
        rho = ema_reliability(self.beta, self.count)
        mu_unbiased = reliability_corrected(self.mu_var, rho, self.count, self.min_count)
        value = {
            "tensor_mean": self.mu_var,
            "spatial": self.spatial,
            "mixed": self.spatial + self.mu_var,
        }[self.statistic]
        signal_raw = self.mu_mean.square()
        return Totals(
            noise=value,
            signal=signal_raw - rho * mu_unbiased,
            count=self.count,
            variance=value,
            signal_raw=signal_raw,
            reliability=rho,
        )
