r"""The ``temporal`` statistic: per-coordinate gradient noise over an EMA window.

For one parameter tensor with N coordinates and EMA weights w_k = (1 − β)β^(t−k)/(1 − β^t)
over its t gradient observations (t counts the steps *this tensor* received a finite gradient):

    m_i = Σ_k w_k g_k,i,        v_i = Σ_k w_k (g_k,i − m_i)²,        ρ_w = Σ_k w_k²

    noise   V = Σ_i v_i / (1 − ρ_w)           (unbiased: E[V] = tr Cov(g))
    signal  S = Σ_i m_i² − ρ_w V              (unbiased: E[S] = ‖E g‖²)

and the inverse signal-to-noise ratio of the applied gradient is ρ = V / S. Sums (not means) over
coordinates, so that tensors aggregate as a ratio of sums.

Two implementations, pinned equal by a float64 test:

* ``foreach`` (fast): one state buffer m per tensor, updated in place by a NaN-safe ``lerp``, and
  one float64 scalar per tensor, q = Σ_k w_k ‖g_k‖² (an EMA of squared norms). Then
  Σ_i v_i = q − ‖m‖² exactly (the weighted variance identity, summed over coordinates). The single
  subtraction happens in float64 on scalars, once per read: its error is about 1e-7 · ‖m‖²,
  i.e. an absolute error of ~1e-7 on ρ, which cannot move the factor 1/(1 + αρ).
* reference (``foreach=False``): the readable per-coordinate West/Welford update of m_i and v_i
  (two buffers per tensor) with :func:`gradstats.moments.ema_update`.
"""

from __future__ import annotations

import torch

from gradstats.moments import ema_reliability, ema_step_size, ema_update
from gradstats.scaling._kernels import Scratch, nan_safe_lerp_, state_dtype
from gradstats.scaling._state import Totals, reliability_corrected

__all__ = ["TemporalState"]


class TemporalState:
    """Temporal-statistic state of the tensors of one device (see the module docstring)."""

    statistic = "temporal"
    min_count = 2  # the unbiased variance needs two observations

    def __init__(self, params: list[torch.Tensor], beta: float, foreach: bool) -> None:
        self.beta, self.foreach = beta, foreach
        device = params[0].device if params else torch.device("cpu")
        self.numel = torch.tensor([p.numel() for p in params], dtype=torch.float64, device=device)
        self.count = torch.zeros(len(params), dtype=torch.int64, device=device)
        self.mean = [torch.zeros_like(p, dtype=state_dtype(p)) for p in params]
        if foreach:
            self.sq_ema = torch.zeros(len(params), dtype=torch.float64, device=device)
            self._scratch = Scratch()
        else:
            self.var = [torch.zeros_like(m) for m in self.mean]

    def update(
        self,
        grads: list[torch.Tensor | None],
        sq_norms: torch.Tensor,
        take: torch.Tensor,
        *,
        grad_inv: torch.Tensor | None = None,
        hook_inv: torch.Tensor | None = None,
    ) -> None:
        """One step. ``take[j]``: tensor j has a gradient and the step is applied.

        ``sq_norms`` are already unscaled; ``grad_inv`` is 1/S when ``.grad`` still carries an
        AMP loss scale S (``hook_inv`` is for same-point hooks and unused here).
        """
        self.count = self.count + take.to(torch.int64)
        step = torch.where(take, ema_step_size(self.beta, self.count), 0.0)
        present = [(j, g) for j, g in enumerate(grads) if g is not None]
        if not present:
            return
        if self.foreach:
            observed = torch.where(take, sq_norms, self.sq_ema)  # NaN never enters
            self.sq_ema = self.sq_ema + step * (observed - self.sq_ema)
            nan_safe_lerp_(
                [self.mean[j] for j, _ in present],
                [g for _, g in present],
                step[[j for j, _ in present]],
                self._scratch,
                grad_inv,
            )
            return
        for j, g in present:
            grad = g.to(self.mean[j].dtype)
            if grad_inv is not None:
                grad = grad * grad_inv.to(grad.dtype)
            clean = torch.nan_to_num(grad, 0.0, 0.0, 0.0)
            self.mean[j], self.var[j] = ema_update(self.mean[j], self.var[j], clean, step[j])

    def totals(self) -> Totals:
        rho = ema_reliability(self.beta, self.count)
        if self.foreach:
            norms = list(torch._foreach_norm(self.mean)) if self.mean else []
            mean_sq = torch.stack(norms).to(torch.float64).square() if norms else self.sq_ema
            population = (self.sq_ema - mean_sq).clamp(min=0.0)
        else:
            mean_sq = self._sum([m.double().square() for m in self.mean])
            population = self._sum([v.double() for v in self.var])
        unbiased = reliability_corrected(population, rho, self.count, self.min_count)
        return Totals(
            noise=unbiased,
            signal=mean_sq - rho * unbiased,
            count=self.count,
            variance=population,
            signal_raw=mean_sq,
            reliability=rho,
        )

    def _sum(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if not tensors:
            return torch.zeros(0, dtype=torch.float64, device=self.count.device)
        return torch.stack([t.sum() for t in tensors])

    # -------------------------------------------------------------- persistence
    def tensor_state(self, j: int) -> dict[str, torch.Tensor]:
        state = {"count": self.count[j].clone(), "mean": self.mean[j].clone()}
        if self.foreach:
            state["sq_ema"] = self.sq_ema[j].clone()
        else:
            state["var"] = self.var[j].clone()
        return state

    def load_tensor_state(self, j: int, state: dict[str, torch.Tensor]) -> None:
        self.count[j] = state["count"]
        self.mean[j].copy_(state["mean"])
        if self.foreach:
            self.sq_ema[j] = state["sq_ema"]
        else:
            self.var[j].copy_(state["var"])

    @staticmethod
    def state_keys(foreach: bool) -> tuple[str, ...]:
        return ("count", "mean", "sq_ema") if foreach else ("count", "mean", "var")
