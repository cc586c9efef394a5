r"""The per-device state of ``statistic="per_sample"``: a :class:`SamePointState` whose K is the
number of units of the step, fed by :class:`~gradstats.scaling._per_sample.PerSampleHooks`
(see :mod:`gradstats.scaling._per_sample` for the estimator and its identities)."""

from __future__ import annotations

import torch

from gradstats._warnings import warn
from gradstats.moments import ema_step_size
from gradstats.moments._distributed import all_reduce_sum_
from gradstats.scaling._host_update import on_host, update_on_host
from gradstats.scaling._same_point import SamePointState

__all__ = ["PerSampleState"]


class PerSampleState(SamePointState):
    """Same-point state fed by module hooks: K = the number of units of the step."""

    statistic = "per_sample"
    parameter_hooks = False  # fed by PerSampleHooks, not by the parameter hooks of same_point

    def __init__(
        self, params: list[torch.Tensor], beta: float, distributed: bool, group: object = None
    ) -> None:
        super().__init__(params, beta, distributed, group)
        self._zero = torch.zeros_like(self._sums)  # never written: index_add is out of place
        self._sums = self._zero
        self._index: dict[tuple[int, ...], torch.Tensor] = {}  # host rows -> device index
        self._ema: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def add_units(
        self, rows: list[int], values: torch.Tensor, count_rows: list[int], counts: list[int]
    ) -> None:
        """Σ_i ‖c_i‖² of one backward: ``values[k]`` adds to tensor ``rows[k]`` (repeats add up),
        and ``counts[k]`` units to tensor ``count_rows[k]`` (host integers: K is known on the
        host). One index_add, no sync (the index vector is built once per distinct layout)."""
        key = tuple(rows)
        index = self._index.get(key)
        if index is None:
            if len(self._index) > 64:
                self._index.clear()
            index = torch.tensor(rows, dtype=torch.int64).to(self._sums.device, non_blocking=True)
            self._index[key] = index
        self._sums = self._sums.index_add(0, index, values.to(self._sums.device))
        for row, n in zip(count_rows, counts, strict=True):
            self._host_passes[row] += n

    def discard_pending(self) -> None:
        super().discard_pending()
        self._sums = self._zero

    def update(
        self,
        grads: list[torch.Tensor | None],
        sq_norms: torch.Tensor,
        take: torch.Tensor,
        *,
        grad_inv: torch.Tensor | None = None,
        hook_inv: torch.Tensor | None = None,
    ) -> None:
        """:meth:`SamePointState.update` with the unit counts K from the host and noise and
        signal side by side in one [2, n] tensor: the same float64 operations on the same
        values (K², max(K, 1) and K − 1 are exact on the host), so the same bits, in fewer ops.
        """
        sums, device = self._sums, self._sums.device
        self._sums = self._zero
        host = [float(k) for k in self._host_passes]
        self._watch_passes()
        if hook_inv is not None:
            sums = sums * hook_inv.to(device=device, dtype=torch.float64).square()
        if on_host(device, self.distributed, len(host)):
            self._update_on_host(sums, sq_norms, take, host)
            return
        if self.distributed:
            local = torch.tensor(host, dtype=torch.float64).to(device, non_blocking=True)
            total_sums, passes = all_reduce_sum_([sums, local], self.group)
            square, clamped, denom = local.square(), passes.clamp(min=1.0), passes - 1.0
        else:  # passes = local: K², max(K, 1), K − 1 and K in one host-to-device copy
            rows = [[k * k for k in host], [max(k, 1.0) for k in host], [k - 1.0 for k in host]]
            known = torch.tensor([*rows, host], dtype=torch.float64)
            square, clamped, denom, passes = known.to(device, non_blocking=True).unbind(0)
            total_sums = sums
        self.last_passes = passes
        small = square * total_sums / clamped  # mean_k ‖M h‖²
        # (noise, signal) = ((A − B)/(K − 1), (K·B − A)/(K − 1)): two_batch_estimates
        estimates = torch.stack([small - sq_norms, passes * sq_norms - small]) / denom
        valid = take & (passes >= 2) & torch.isfinite(estimates).all(0)
        self.count = self.count + valid
        step = torch.where(valid, ema_step_size(self.beta, self.count), 0.0)
        ema = self._stacked_ema()
        ema = ema + step * (torch.where(valid, estimates, 0.0) - ema)
        self.noise_ema, self.signal_ema = ema.unbind(0)
        self._ema = (ema, self.noise_ema, self.signal_ema)

    def _update_on_host(
        self, sums: torch.Tensor, sq_norms: torch.Tensor, take: torch.Tensor, host: list[float]
    ) -> None:
        """:meth:`update` on Python floats (:mod:`~gradstats.scaling._host_update`)."""
        noise, signal = self._stacked_ema().tolist()  # sync-ok: CPU state
        new = update_on_host(self.beta, sums, sq_norms, take, host, self.count, (noise, signal))
        self.count, self.last_passes = new.count, new.passes
        self.noise_ema, self.signal_ema = new.ema.unbind(0)
        self._ema = (new.ema, self.noise_ema, self.signal_ema)

    def _stacked_ema(self) -> torch.Tensor:
        """[noise_ema; signal_ema]: the tensor they are views of, unless they were replaced."""
        if self._ema is not None:
            ema, noise, signal = self._ema
            if self.noise_ema is noise and self.signal_ema is signal:
                return ema
        return torch.stack([self.noise_ema, self.signal_ema])

    def _watch_passes(self) -> None:
        """Warn once when no per-example norm was recorded for ``STARVED_UPDATES`` updates."""
        units = max(self._host_passes, default=0)
        self._host_passes = [0] * len(self._host_passes)
        self.starved = 0 if units >= 2 else self.starved + 1
        if self.starved == 20 and not self.warned:
            self.warned = True
            warn(
                "statistic='per_sample' has had no estimate for 20 updates: the hooks on the "
                "model's modules recorded fewer than 2 units per step (a batch of one, a "
                "forward that does not run through the model given to the scaler, or backward "
                "inside paused()); the factor stays 1 and rho is NaN",
                RuntimeWarning,
            )
