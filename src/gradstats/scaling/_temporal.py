r"""The ``temporal`` statistic: per-coordinate gradient noise over an EMA window.

For one parameter tensor with N coordinates and EMA weights w_k = (1 − β)β^(t−k)/(1 − β^t)
over its t gradient observations (t counts the steps *this tensor* received a finite gradient):

    m_i = Σ_k w_k g_k,i,        v_i = Σ_k w_k (g_k,i − m_i)²,        ρ_w = Σ_k w_k²

    noise   V = Σ_i v_i / (1 − ρ_w)           (unbiased: E[V] = tr Cov(g))
    signal  S = Σ_i m_i² − ρ_w V              (unbiased: E[S] = ‖E g‖²)

and the inverse signal-to-noise ratio of the applied gradient is ρ = V / S. Sums (not means) over
coordinates, so that tensors aggregate as a ratio of sums.

Both implementations use the deviation (West/Welford) form, with a_t = w_t the step size
(:func:`gradstats.moments.ema_step_size`) and δ = g_t − m_{t−1}:

    m ← m + a δ,        v ← (1 − a)(v + a δ²)

which never subtracts two large numbers, so it is right in float32 whatever the gradients'
offset (gradients of 1e4 ± 0.1) or scale (1e-24 … 1e19). Pinned equal to each other and to a
float64 brute force (:func:`gradstats.testing.reference_scaler_statistics`) by tests, in float32
and float64.

* ``foreach`` (fast): one state buffer m per tensor (float32, or the parameter's dtype if wider)
  and two float64 scalars per tensor: P = Σ_i v_i, updated as P ← (1 − a)(P + a‖δ‖²) — the
  coordinate sum of the West update, exact — and Q = ‖m‖², carried by the identity
  ‖m + aδ‖² = (1 − a)‖m‖² + a‖g‖² − a(1 − a)‖δ‖² (from ‖g‖² = ‖m + δ‖²; every term is
  non-negative up to the last, which is the small one), so no pass over m is needed to read the
  signal. On the CPU with a C compiler, when every tensor has a gradient, the whole update is
  one pass (:meth:`TemporalState.measure`,
  :class:`~gradstats.scaling._kernels.NativeDeviationInto`): while the engine observes the
  step it forms ‖g‖² and δ = g − m in float64 registers, sums δ² in float64 and writes m + aδ
  to the other buffer of a pair (12 B/element in float32 for the whole update); the update
  applies it by flipping the tensors' parity bits, or drops it (non-finite, skipped) by doing
  nothing. Otherwise (a missing gradient) the engine's ‖g‖² pass and one fused in-place pass
  per dtype group (:class:`~gradstats.scaling._kernels.NativeDeviation`, 16 B/element with the
  ‖g‖² pass; tensors with a = 0 skipped) give the same bits. Elsewhere (no compiler,
  other devices) δ is formed in a flat scratch buffer
  (:func:`~gradstats.scaling._kernels.deviation_step_`: seven foreach/whole-buffer ops per
  dtype, whatever the number of tensors), multiplied by an exact power of two c that brings its
  coordinates to order one, so that ‖cδ‖² is summed in the state dtype without over- or
  underflow at any gradient scale (1e-24 … 1e19 in float32).
* reference (``foreach=False``): the readable per-coordinate update of m_i and v_i, tensor by
  tensor, in float64 (v_i is kept in float64: δ² of float32 gradients can under/overflow float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradstats.moments import ema_reliability, ema_step_size, ema_update
from gradstats.scaling._kernels import (
    FlatScratch,
    NativeDeviation,
    NativeDeviationInto,
    deviation_step_,
    native_kernels_available,
    power_of_two_scale,
    state_dtype,
)
from gradstats.scaling._state import Totals, reliability_corrected

__all__ = ["Prepared", "TemporalState"]


@dataclass(frozen=True)
class Prepared:
    """A step computed ahead by :meth:`TemporalState.measure`: ‖g_j‖² (unscaled), ‖δ_j‖², the
    step sizes a_j it assumed (every tensor taken) — its new means wait in the spare buffers."""

    sq_norms: torch.Tensor
    dev_sq: torch.Tensor
    step: torch.Tensor


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
        self._pending: Prepared | None = None  # the latest measure's step, until an update
        self._settled = True  # self.mean holds every m_j (no one-pass step since _settle)
        # the one-pass kernel's buffer pairs: m_j is spare[j] where parity[j], else mean[j]
        self._spare: list[torch.Tensor] | None = None  # allocated by the first measure
        self._parity = torch.zeros(0, dtype=torch.bool)
        self._into: NativeDeviationInto | None = None
        if foreach:
            zeros = torch.zeros(len(params), dtype=torch.float64, device=device)
            self.var_sum, self.mean_sq = zeros, zeros.clone()
            by_dtype: dict[torch.dtype, list[int]] = {}
            for j, m in enumerate(self.mean):
                by_dtype.setdefault(m.dtype, []).append(j)
            self._groups = [
                (rows, FlatScratch([self.mean[j] for j in rows])) for rows in by_dtype.values()
            ]
            self._index: dict[
                tuple[int, tuple[bool, ...]],
                tuple[list[int], torch.Tensor, NativeDeviation, bool],
            ] = {}
        else:
            self.var = [torch.zeros_like(m, dtype=torch.float64) for m in self.mean]

    def update(
        self,
        grads: list[torch.Tensor | None],
        sq_norms: torch.Tensor,
        take: torch.Tensor,
        *,
        grad_inv: torch.Tensor | None = None,
        hook_inv: torch.Tensor | None = None,
        prepared: Prepared | None = None,
    ) -> None:
        """One step. ``take[j]``: tensor j has a gradient and the step is applied.

        ``sq_norms`` are ‖g_j‖², already unscaled; ``grad_inv`` is 1/S when ``.grad`` still
        carries an AMP loss scale S (``hook_inv`` is for same-point hooks and unused here).
        ``prepared``: what :meth:`measure` computed for this step's observation; it is used
        only if it is the latest measurement and nothing changed the state since.
        """
        pending, self._pending = self._pending, None
        self.count = self.count + take  # int64 + bool: int64
        if prepared is not None and prepared is pending:
            self._commit(prepared, sq_norms, take)
            return
        self._settle()
        step = torch.where(take, ema_step_size(self.beta, self.count), 0.0)
        if not any(g is not None for g in grads):
            return
        if self.foreach:
            self._update_foreach(grads, sq_norms, take, step, grad_inv)
            return
        for j, g in enumerate(grads):
            if g is None:
                continue
            grad = g.to(torch.float64)
            if grad_inv is not None:
                grad = grad * grad_inv.to(torch.float64)
            clean = torch.nan_to_num(grad, 0.0, 0.0, 0.0)  # step[j] = 0 then: m, v unchanged
            mean, self.var[j] = ema_update(self.mean[j].double(), self.var[j], clean, step[j])
            self.mean[j] = mean.to(self.mean[j].dtype)

    def _update_foreach(
        self,
        grads: list[torch.Tensor | None],
        sq_norms: torch.Tensor,
        take: torch.Tensor,
        step: torch.Tensor,
        grad_inv: torch.Tensor | None,
    ) -> None:
        scale: torch.Tensor | None = None
        dev_sq: torch.Tensor | None = None
        for number, (rows, scratch) in enumerate(self._groups):
            present = tuple(grads[j] is not None for j in rows)
            if not any(present):
                continue
            key = (number, present)
            if key not in self._index:
                local = [k for k, p in enumerate(present) if p]
                index = torch.tensor([rows[k] for k in local], device=self.count.device)
                native = NativeDeviation([self.mean[rows[k]] for k in local])
                # every tensor, in order: the group's results are the vector itself
                whole = len(local) == len(grads) and rows == list(range(len(grads)))
                self._index[key] = (local, index, native, whole)
            local, index, native, whole = self._index[key]
            present_grads = [g for g in (grads[rows[k]] for k in local) if g is not None]
            weights = step if whole else step[index]
            sq = native(present_grads, weights, grad_inv)
            if sq is None:  # no compiler, not the CPU, ...: the foreach kernel
                if scale is None:  # c_j: brings ‖g_j‖, ‖m_j‖ per coordinate to order one
                    ratio = torch.maximum(sq_norms, self.mean_sq) / self.numel.clamp(1)
                    scale = power_of_two_scale(ratio)
                views = scratch.views()
                sq = deviation_step_(
                    native.means,
                    present_grads,
                    [views[k] for k in local],
                    scratch.flat,
                    weights,
                    scale if whole else scale[index],
                    grad_inv,
                )
            if whole:
                dev_sq = sq
            else:
                dev_sq = torch.zeros_like(self.var_sum) if dev_sq is None else dev_sq
                dev_sq = dev_sq.index_copy(0, index, sq)
        if dev_sq is not None:
            self._fold(dev_sq, sq_norms, take, step)

    def measure(
        self, grads: list[torch.Tensor], grad_inv: torch.Tensor | None = None
    ) -> Prepared | None:
        """‖g_j‖² of every tensor (all of them have a gradient) by the one-pass native kernel
        (:class:`~gradstats.scaling._native.NativeDeviationInto`), which also forms this
        step's new means, as if every tensor were taken, in the other buffer of each pair;
        None where it does not apply (the caller then runs ``squared_norms``, and
        :meth:`update` the two-pass step). Nothing the state reads changes: :meth:`update`
        with the result applies the step by flipping the tensors' parity bits (no host
        read), or drops it. The spares cost one more state-sized buffer, allocated on the
        first call (CPU, native kernels on)."""
        if not self.foreach or not self.mean or not self.mean[0].is_cpu:
            return None
        if self._into is None:
            if not native_kernels_available():
                return None
            spare = [torch.empty_like(m) for m in self.mean]
            parity = torch.zeros(len(self.mean), dtype=torch.bool)
            self._into = NativeDeviationInto(self.mean, spare, parity)
            if self._into.ready:
                self._spare, self._parity = spare, parity
        step = ema_step_size(self.beta, self.count + 1)
        result = self._into(grads, step, grad_inv)
        self._pending = None if result is None else Prepared(*result, step)
        return self._pending

    def _commit(self, prepared: Prepared, sq_norms: torch.Tensor, take: torch.Tensor) -> None:
        """Apply (where ``take``) the step :meth:`measure` prepared: flip those parity bits."""
        torch.logical_xor(self._parity, take, out=self._parity)
        self._settled = False
        self._fold(prepared.dev_sq, sq_norms, take, torch.where(take, prepared.step, 0.0))

    def _current_mean(self, j: int) -> torch.Tensor:
        """The buffer that holds m_j now (checkpoints read and load it without settling)."""
        if self._settled or self._spare is None:
            return self.mean[j]
        return self._spare[j] if bool(self._parity[j]) else self.mean[j]  # sync-ok: CPU

    def _settle(self) -> None:
        """Make ``self.mean`` hold every m_j again (copying from the spares where the parity
        bit is set): before any path that reads or writes the means in place. One host read
        of the parity bits (CPU), only after one-pass steps."""
        if self._settled or self._spare is None:
            return
        for j, odd in enumerate(self._parity.tolist()):  # sync-ok: CPU, off the one-pass path
            if odd:
                self.mean[j].copy_(self._spare[j])
        self._parity.zero_()
        self._settled = True

    def _fold(
        self, dev_sq: torch.Tensor, sq_norms: torch.Tensor, take: torch.Tensor, step: torch.Tensor
    ) -> None:
        """P ← (1 − a)(P + a‖δ‖²) and Q ← (1 − a)Q + a‖g‖² − a(1 − a)‖δ‖² where taken."""
        # where a tensor is not taken (no gradient, a dropped step: a = 0) its entries of
        # dev_sq / sq_norms may be NaN or stale; torch.where keeps the old value there and
        # never propagates them, so they need no cleaning first
        a, keep = step, torch.rsub(step, 1.0)  # a = 0 where not taken; keep = 1 − a
        self.var_sum = torch.where(take, keep * (self.var_sum + a * dev_sq), self.var_sum)
        carried = keep * self.mean_sq + a * sq_norms - a * keep * dev_sq
        self.mean_sq = torch.where(take, carried.clamp(min=0.0), self.mean_sq)

    def totals(self) -> Totals:
        rho = ema_reliability(self.beta, self.count)
        if self.foreach:
            mean_sq, population = self.mean_sq, self.var_sum
        else:
            mean_sq = self._sum([m.double().square() for m in self.mean])
            population = self._sum(self.var)
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
        """``count``, ``mean``, and ``var_sum`` = Σ_i v_i and ``mean_sq`` = ‖m‖² (fast) or
        ``var`` = v (reference).

        The fast state also carries ``sq_ema`` = Σ_i v_i + ‖m‖² = Σ_k w_k ‖g_k‖², the EMA of
        squared gradient norms that earlier versions stored (read-only: loading uses
        ``var_sum`` when present)."""
        state = {"count": self.count[j].clone(), "mean": self._current_mean(j).clone()}
        if self.foreach:
            state["var_sum"] = self.var_sum[j].clone()
            state["mean_sq"] = self.mean_sq[j].clone()
            state["sq_ema"] = self.var_sum[j] + self.mean_sq[j]
        else:
            state["var"] = self.var[j].clone()
        return state

    def load_tensor_state(self, j: int, state: dict[str, torch.Tensor]) -> None:
        self._pending = None
        self.count[j] = state["count"]
        self._current_mean(j).copy_(state["mean"])
        if self.foreach:
            self.var_sum[j] = state["var_sum"]
            self.mean_sq[j] = state["mean_sq"]
        else:
            self.var[j].copy_(state["var"])

    @staticmethod
    def state_keys(foreach: bool) -> tuple[str, ...]:
        return ("count", "mean", "var_sum", "mean_sq") if foreach else ("count", "mean", "var")
