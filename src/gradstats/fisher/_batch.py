r"""One batch's buffers and how they are folded into the statistics.

For a batch of N units the handlers fill, per parameter, Σ_units g² (and, with
``element_se``, the sums Σ(g² − c), Σ(g² − c)² about a reference c taken from the batch), per
family the per-unit rows of group traces and mask values; the collector adds Σ_units g for the
mean gradient. The batch is accepted only when every one of these sums is finite (checked by
one native-dtype sum per tensor, on the device); a non-finite batch follows the ``nonfinite``
policy: ``"skip"`` masks it out on the device (counted in ``skipped``), ``"raise"`` raises
:class:`~gradstats.errors.NonFiniteError` before the state changes (one host read).
"""

from __future__ import annotations

import math

import torch

from gradstats.errors import ConfigurationError, NonFiniteError
from gradstats.fisher._accumulate import UnitLayout
from gradstats.fisher._engine import Engine
from gradstats.fisher._likelihood_base import Likelihood, Prepared
from gradstats.fisher._reads import FisherReads

__all__ = ["BatchCore"]


class BatchCore(FisherReads):
    """Mixin of :class:`~gradstats.fisher.FisherCollector`: batch layout and folding."""

    _compute_dtype: torch.dtype
    _check_pending: bool
    max_exact_passes: int

    @property
    def _live_engine(self) -> Engine:
        """The model hooks; a collector that was closed or loaded without a model has none."""
        if self._engine is None:
            raise ConfigurationError(
                "this collector has no model hooks (it was closed or loaded without a model); "
                "pass model= to FisherCollector.load() to keep collecting"
            )
        return self._engine

    @property
    def _live_likelihood(self) -> Likelihood:
        if self.likelihood is None:
            raise ConfigurationError(
                "this collector was loaded without a model and has no likelihood; pass model= "
                "(and likelihood= for a callable) to FisherCollector.load() to keep collecting"
            )
        return self.likelihood

    def _layout(self, prepared: Prepared, device: torch.device, check: bool = False) -> UnitLayout:
        dtype = self._compute_dtype
        if check:  # the completeness check: samples as units, only Σ_i g_i is read
            layout = UnitLayout("sample", prepared.n_samples, None, self.chunk_bytes, dtype, lin={})
        else:
            mask = prepared.token_mask
            layout = UnitLayout(self.unit, prepared.n_samples, mask, self.chunk_bytes, dtype)
        if self.element_se and not check:
            layout.se = True
        # on the CPU (where the batch's acceptance is read for free) Σg² products go straight
        # into the pending sums once the batch is accepted (cumulative sums only)
        if not check and device.type == "cpu" and self._state.defers_products:
            layout.gemms = []
        families = self._unit_families
        layout.family_sizes = [fam.size for fam in families]
        for buffers in (layout.trace, layout.mask_lin, layout.mask):
            buffers.extend([None] * len(families))
        return layout

    def _finish(
        self,
        prepared: Prepared,
        layout: UnitLayout,
        checks: list[torch.Tensor],
        g_sum: dict[str, torch.Tensor],
        draw_weight_sq: float,
    ) -> None:
        """Check the batch's statistics and fold them into the state (or skip / raise).

        ``checks``: scalars (the pass objectives, …) that must be finite too."""
        device = self._state.device
        deferred = set() if layout.gemms is None else {g[0] for g in layout.gemms}
        sq = {
            n: layout.sq[n]
            if n in layout.sq
            else torch.zeros(shape, dtype=self._compute_dtype, device=device)
            for n, shape in self._state.shapes.items()
            if n not in deferred or n in layout.sq
        }
        if self.collect_signal:
            for name in self._state.shapes:
                if name not in g_sum:  # (not setdefault: that would allocate zeros every time)
                    shape = self._state.shapes[name]
                    g_sum[name] = torch.zeros(shape, dtype=self._compute_dtype, device=device)
        trace_rows: dict[str, torch.Tensor] = {}
        mask_rows: dict[str, torch.Tensor] = {}
        for index, fam in enumerate(self._unit_families):
            trace_rows[fam.name] = layout.family_rows(layout.trace, index, device)
            mask_rows[fam.name] = layout.family_rows(layout.mask, index, device)
        # with token units every position is a row; the inactive ones get weight 0 (no boolean
        # selection, so no host sync) and are no observations of the per-unit statistics
        row_weight = None
        if self.unit == "token" and self._unit_families:
            row_weight = (prepared.active.reshape(-1) > 0).to(device, torch.float64)
        # every statistic of the batch must be finite (Σ(x − c)² can overflow where Σ g² does
        # not): one sum per tensor in its own dtype (NaN and ±inf propagate; 9× cheaper than
        # float64 sums). A false alarm needs a tensor whose elements add up past 3.4e38 — a
        # Fisher total no float32 statistic could hold anyway.
        # A Linear layer's Σg² of one position per unit comes with a proxy instead (see
        # LinearHandler): Σ_i ‖b_i‖²‖a_i‖² is the sum of all elements of (b²)ᵀ(a²), finite
        # iff each of them is (they are non-negative), at the cost of O(n) sums, not O(P).
        # Σg needs no check of its own: it sums the same per-unit gradients whose squares Σg²
        # holds, so |Σ_i g_i| ≤ sqrt(N · Σ_i g_i²) is finite whenever Σg² is, and a NaN/inf in
        # any g_i is one in Σg² too (the first batch's check ties autograd's Σg to the hooks')
        proxied = set() if layout.se else set(layout.proxy)
        parts = [t for n, t in sq.items() if n not in proxied]
        parts += [*trace_rows.values(), *mask_rows.values()]
        parts += [*layout.dev.values(), *layout.dev2.values()]
        sums = [t.sum() for t in parts if t.numel()]
        if proxied:
            sums += [v for n in proxied for v in layout.proxy[n]]
        sums += checks
        ok: torch.Tensor | bool = True
        if sums:  # s − s is 0 exactly when s is finite (NaN and ±inf give NaN); |parts| summed
            # in float64 so that finite float32 parts never add up to a false inf, and so that
            # the total bounds every entry of the batch's Σg² (the state's pending sums)
            total = torch.stack(sums).abs().sum(dtype=torch.float64)
            if device.type == "cpu":  # read anyway (accepted_flag): fold before an overflow
                bound = total.item()  # sync-ok: CPU only
                ok = math.isfinite(bound)
                if ok:
                    self._state.reserve(bound)
            else:
                ok = (total - total) == 0
        if self.nonfinite == "raise" and not bool(ok):  # sync-ok: nonfinite="raise" (documented)
            raise NonFiniteError(
                "non-finite batch (nonfinite='raise'): its loss or per-unit statistics (Σg², Σg, "
                "Σg⁴ or group values) hold NaN/inf; nothing was accumulated"
            )
        tokens = prepared.n_tokens
        if not isinstance(tokens, int):
            tokens = tokens.to(device)
        n_units = None  # sample units: the state counts n_samples
        if self.unit == "token":
            n_units = torch.as_tensor(tokens, dtype=torch.float64, device=device)
        self._state.update(
            ok,
            n_units,
            prepared.n_samples,
            tokens,
            draw_weight_sq,
            sq,
            (layout.ref, layout.dev, layout.dev2) if layout.se else None,
            g_sum,
            trace_rows,
            mask_rows,
            row_weight,
            gemms=layout.gemms,
        )
