r"""The collector's float64 statistics: exact sums, Chan merges, all-reduce, debiased EMA.

Per parameter element j, over units i (samples or tokens) and passes k with weights w_k
(Σ_k w_k = 1; one pass of weight 1 for ``"empirical"``):

* ``g2_sum`` = Σ_i x_ij with x_ij = Σ_k w_k g_ikj² — the Fisher numerator. The Fisher is
  F_jj = g2_sum / N (N = number of units), exactly additive over batches, files and ranks.
* ``g_sum`` = Σ_i Σ_k w_k g_ikj — so ḡ_j = g_sum / N and, exactly, F_jj = ḡ_j² + Var_j with
  Var_j = Σ_{i,k} w_k (g_ikj − ḡ_j)² / N (the "signal", "second moment" and "variance" of
  the Fisher decomposition EF = (ḡ)² + Var).
* ``g2_m2`` (``element_se``) = Σ_i (x_ij − F_jj)², merged batch by batch with Chan's formula
  (:func:`gradstats.moments.combine`), so SE(F_jj) = sqrt(g2_m2 / (N − 1) / N). Each
  batch arrives as sums centred on a reference c_j taken from the batch itself —
  Σ_i (x_ij − c_j) and Σ_i (x_ij − c_j)², computed in the model's dtype — so float32 models
  get float64-grade standard errors even when g sits on an offset far above its spread
  (the uncentred Σx² − (Σx)²/n of float32 sums cancels catastrophically there).
* Per family: :class:`~gradstats.moments.RunningMoments` of the per-unit group traces and mask
  values (the unit is the observation, never a batch weighted by its token count).

In ``mode="ema"`` the batch means replace the sums: :class:`~gradstats.moments.EMAMoments`
(zero-initialised, divided by 1 − β^k, so a constant input reads exactly that constant) of the
per-batch mean of x_ij, of ḡ and of the group mask values.

Non-finite batches (any statistic: Σg², Σg⁴, Σg, group rows) are skipped on the device (``ok``
flag): nothing changes but the ``skipped`` count. In ``mode="ema"`` a batch without units
(``unit="token"``, no active target) is skipped too: it has no mean to average in.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gradstats.errors import ConfigurationError
from gradstats.fisher._state_load import load_tensors
from gradstats.fisher._state_parts import (
    FamilyMoments,
)
from gradstats.fisher._state_pending import (
    PendingGroups,
    PendingSums,
    add_counts,
    batch_flag,
    masked_add_,
    unit_count,
)
from gradstats.moments import (
    EMAMoments,
    Moments,
    RunningMoments,
    all_reduce_moments,
    all_reduce_sum_,
    combine,
    safe_inverse,
)

__all__ = ["COUNT_KEYS", "FisherState"]

COUNT_KEYS = ("samples", "tokens", "batches", "skipped", "draw_weight_sq")


def _moments(count: torch.Tensor, total: torch.Tensor, m2: torch.Tensor) -> Moments:
    """A frequency-weighted summary of ``count`` observations with sum ``total`` and M2 ``m2``."""
    return Moments(count, count, count, total * safe_inverse(count), m2)


class FisherState:
    """Statistics of the units seen so far (see the module docstring)."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        device: torch.device,
        *,
        unit: str,
        mode: str,
        beta: float,
        signal: bool,
        element_se: bool,
        families: list[tuple[str, int]],
    ) -> None:
        self.shapes, self.unit, self.mode, self.beta = shapes, unit, mode, beta
        self.signal, self.element_se = signal, element_se
        self.families = families
        self.device = device
        self.counts = {key: self._zeros(()) for key in COUNT_KEYS}
        self._g2_sum: dict[str, torch.Tensor] = {}
        self._g_sum: dict[str, torch.Tensor] = {}
        # accepted batches not yet folded in (see gradstats.fisher._state_pending)
        self._pending = PendingSums()
        self._pending_rows = (PendingGroups(), PendingGroups())
        self.g2_m2: dict[str, torch.Tensor] = {}
        # one RunningMoments per quantity over all families side by side (every family sees the
        # same rows, so the counts agree): 2 updates per batch instead of 2 per family
        self.trace_all: RunningMoments | None = None
        self.mask_all: RunningMoments | None = None
        self.g2_ema: dict[str, EMAMoments] = {}
        self.g_ema: dict[str, EMAMoments] = {}
        self.mask_ema: dict[str, EMAMoments] = {}
        if mode == "cumulative":
            self._g2_sum = {n: self._zeros(s) for n, s in shapes.items()}
            self._g_sum = {n: self._zeros(s) for n, s in shapes.items()} if signal else {}
            self.g2_m2 = {n: self._zeros(s) for n, s in shapes.items()} if element_se else {}
            if families:
                total = sum(g for _, g in families)
                self.trace_all = RunningMoments((total,), device=device)
                self.mask_all = RunningMoments((total,), device=device)
        else:
            self.g2_ema = {n: self._ema(s) for n, s in shapes.items()}
            self.g_ema = {n: self._ema(s) for n, s in shapes.items()} if signal else {}
            self.mask_ema = {f: self._ema((g,)) for f, g in families}

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float64, device=self.device)

    def _ema(self, shape: tuple[int, ...]) -> EMAMoments:
        return EMAMoments(self.beta, shape, dtype=torch.float64, device=self.device)

    # ------------------------------------------------------------ deferred
    def reserve(self, bound: float) -> None:
        """Before :meth:`update` of a batch whose pending entries are at most ``bound``."""
        if not self.defers_products:
            return
        if self._pending.crowded(bound):
            self.flush()
        self._pending.reserve(bound)

    def flush(self) -> None:
        """Fold every pending batch into the float64 statistics (before any read)."""
        pending = self._pending
        if pending.batches:
            targets = {("sq", n): v for n, v in self._g2_sum.items()}
            targets |= {("g", n): v for n, v in self._g_sum.items()}
            pending.fold(targets)  # type: ignore[arg-type]
        for stash, stats in zip(self._pending_rows, (self.trace_all, self.mask_all), strict=True):
            if stats is not None:
                stash.fold(stats)

    @property
    def g2_sum(self) -> dict[str, torch.Tensor]:
        """{name: Σ_i x_ij} (float64; folds pending batches first)."""
        self.flush()
        return self._g2_sum

    @g2_sum.setter
    def g2_sum(self, value: dict[str, torch.Tensor]) -> None:
        self._g2_sum = value

    @property
    def g_sum(self) -> dict[str, torch.Tensor]:
        """{name: Σ_i Σ_k w_k g_ikj} (float64; folds pending batches first)."""
        self.flush()
        return self._g_sum

    @g_sum.setter
    def g_sum(self, value: dict[str, torch.Tensor]) -> None:
        self._g_sum = value

    @property
    def defers_products(self) -> bool:
        """Whether :meth:`update` takes deferred Σg² products (cumulative sums, no Chan merge)."""
        return self.mode == "cumulative" and not self.element_se

    def _sq_shape(self, key: tuple[str, str]) -> tuple[int, ...]:
        return self.shapes[key[1]]

    # ----------------------------------------------------------------- update
    @property
    def unit_key(self) -> str:
        """The count that normalises per unit: ``"samples"`` or ``"tokens"``."""
        return "samples" if self.unit == "sample" else "tokens"

    @property
    def units(self) -> torch.Tensor:
        return self.counts[self.unit_key]

    def update(
        self,
        ok: torch.Tensor | bool,
        n_units: torch.Tensor | None,
        n_samples: int,
        n_tokens: torch.Tensor | int,
        draw_weight_sq: float,
        sq: dict[str, torch.Tensor],
        centred: tuple[dict[str, torch.Tensor], ...] | None,
        g_sum: dict[str, torch.Tensor],
        trace_rows: dict[str, torch.Tensor],
        mask_rows: dict[str, torch.Tensor],
        row_weight: torch.Tensor | None = None,
        gemms: list | None = None,
    ) -> None:
        """Fold one batch in (every argument on the state's device; nothing read to the host).

        ``row_weight`` ([rows], 0 or 1; None: all 1) marks which rows of the per-unit group
        values are units (token units: the positions with an active target). ``centred``
        (``element_se``): per parameter the reference m (c = m²), Σ(x − c) and Σ(x − c)² of x = g²
        over the batch's n units, whose batch mean c + Σ(x − c)/n and M2
        Σ(x − c)² − (Σ(x − c))²/n are merged into ``g2_m2`` with Chan's formula. ``gemms``
        (only where :attr:`defers_products`): deferred parts of Σg², (name, index, m1, m2)
        meaning Σg²[name][index] += m1 @ m2, added straight into the pending sums.

        ``ok``: the batch's finite flag, a bool tensor on the device or a bool where the
        caller knows it on the host; ``n_units``: the batch's unit count (float64), None for
        ``unit="sample"`` (then ``n_samples``)."""
        accepted, ok = batch_flag(ok, self.device)
        if n_units is None and self.unit != "sample":
            raise RuntimeError("token units need the batch's unit count")
        if self.mode == "cumulative" and self.element_se:
            if centred is None:
                raise RuntimeError("element_se statistics need the batch's centred sums")
            refs, devs, dev2s = centred
            n_units = unit_count(n_units, n_samples, self.device)
            inv = safe_inverse(n_units)
            totals = dict(sq)
            for name in sq:
                old = _moments(self.units, self.g2_sum[name], self.g2_m2[name])
                if name in refs:  # c = m²: mean c + Σ(x − c)/n, M2 = Σ(x − c)² − (Σ(x − c))²/n
                    dev = devs[name].to(torch.float64)
                    mean_b = refs[name].to(torch.float64).square() + dev * inv
                    m2_b = (dev2s[name].to(torch.float64) - dev.square() * inv).clamp_(min=0.0)
                else:  # no per-unit gradient reached it this batch: every x is 0
                    mean_b = torch.zeros_like(self.g2_m2[name])
                    m2_b = mean_b
                batch = Moments(n_units, n_units, n_units, mean_b, m2_b)
                merged = combine(old, batch)
                self.g2_m2[name] = torch.where(ok, merged.m2, self.g2_m2[name])
                # the same batch total n·c + Σ(x − c) (float64) in g2_sum, so that the next
                # merge's mean difference carries no float32 rounding of Σx
                totals[name] = mean_b * n_units
            sq = totals
        if self.mode == "cumulative":
            if self.element_se:  # each batch's totals are float64 already: add them now
                for name, total in sq.items():
                    masked_add_(self._g2_sum[name], total, ok, accepted)
                for name, total in g_sum.items():
                    masked_add_(self._g_sum[name], total, ok, accepted)
            else:
                if gemms and self.element_se:
                    raise RuntimeError("deferred Σg² products need mode='cumulative' sums")
                values = {("sq", n): v for n, v in sq.items()}
                values |= {("g", n): v for n, v in g_sum.items()}
                products = [(("sq", n), i, m1, m2) for n, i, m1, m2 in gemms or ()]
                self._pending.add(values, ok, accepted, products, self._sq_shape)  # type: ignore[arg-type]
                if self._pending.due():
                    self.flush()
            units = None if row_weight is None else row_weight > 0  # no host sync (no indexing)
            stats_rows = ((self.trace_all, trace_rows), (self.mask_all, mask_rows))
            for (stats, per_unit), stash in zip(stats_rows, self._pending_rows, strict=True):
                if stats is not None and per_unit:  # a skipped batch is counted there too
                    rows = torch.cat([per_unit[f] for f, _ in self.families], dim=1)
                    stash.add(stats, rows, units, ok, accepted)
        else:
            n_units = unit_count(n_units, n_samples, self.device)
            inv = safe_inverse(n_units)
            skip = ~ok | (n_units <= 0)  # a batch without units is no observation of the mean
            for name, total in sq.items():
                self.g2_ema[name].update(total * inv, skip=skip)
            for name, total in g_sum.items():
                self.g_ema[name].update(total * inv, skip=skip)
            for fam, rows in mask_rows.items():
                if row_weight is None:
                    mean = rows.to(torch.float64).mean(0)
                else:
                    mean = (rows.to(torch.float64) * row_weight[:, None]).sum(0) * inv
                self.mask_ema[fam].update(mean, skip=skip)
        dw_units = draw_weight_sq * (n_samples if n_units is None else n_units)
        add_counts(self.counts, ok, accepted, n_samples, n_tokens, dw_units)

    # ------------------------------------------------------------------ reads
    def norm(self, normalization: str) -> torch.Tensor:
        key = {"unit": "samples" if self.unit == "sample" else "tokens", "sample": "samples"}
        key["token"] = "tokens"
        if normalization == "none":
            return torch.ones((), dtype=torch.float64, device=self.device)
        return self.counts[key[normalization]]

    def fisher(self, name: str, normalization: str = "unit") -> torch.Tensor:
        if self.mode == "ema":
            return self.g2_ema[name].mean
        denominator = self.norm(normalization)
        return torch.where(denominator > 0, self.g2_sum[name] / denominator, float("nan"))

    def mean_gradient(self, name: str) -> torch.Tensor:
        if self.mode == "ema":
            return self.g_ema[name].mean
        units = self.units
        return torch.where(units > 0, self.g_sum[name] / units, float("nan"))

    def fisher_standard_error(self, name: str) -> torch.Tensor:
        """sqrt(M2 / (N − 1) / N): the standard error of F_jj (NaN while N <= 1)."""
        n = self.units
        valid = n > 1
        denom = torch.where(valid, (n - 1.0) * n, torch.ones_like(n))
        return torch.where(valid, (self.g2_m2[name] / denom).sqrt(), float("nan"))

    def mean_gradient_standard_error(self, name: str) -> torch.Tensor:
        """SE of ḡ with (unit, draw) observations weighted w_k (reliability weights):
        var = N·(F − ḡ²) / (N − W₂/N), SE = sqrt(var · W₂) / N, W₂ = Σ w_k²."""
        n, w2 = self.units, self.counts["draw_weight_sq"]
        g = self.mean_gradient(name)
        m2 = (self.fisher(name) - g.square()).clamp(min=0.0) * n
        denom = n - w2 * safe_inverse(n)
        valid = denom > 0
        var = m2 / torch.where(valid, denom, torch.ones_like(denom))
        return torch.where(valid, (var * w2).sqrt() * safe_inverse(n), float("nan"))

    # ------------------------------------------------------- merge / reduce
    def merge(self, other: FisherState) -> None:
        if self.mode != "cumulative":
            raise ConfigurationError(
                "mode='ema' summaries do not merge: an EMA weights batches by arrival time; "
                "use mode='cumulative' to merge collectors"
            )
        self.flush()
        other.flush()
        for name in self.g2_sum:
            if self.element_se:
                mine = _moments(self.units, self.g2_sum[name], self.g2_m2[name])
                theirs = _moments(other.units, other.g2_sum[name], other.g2_m2[name])
                self.g2_m2[name] = combine(mine, theirs).m2
            self.g2_sum[name] += other.g2_sum[name].to(self.device)
            if self.signal:
                self.g_sum[name] += other.g_sum[name].to(self.device)
        pairs = ((self.trace_all, other.trace_all), (self.mask_all, other.mask_all))
        for ours, their_stats in pairs:
            if ours is not None and their_stats is not None:
                ours.merge(their_stats)
        for key in COUNT_KEYS:
            self.counts[key] += other.counts[key].to(self.device)

    def all_reduce(self, group: object | None = None) -> None:
        if self.mode != "cumulative":
            raise ConfigurationError(
                "mode='ema' summaries cannot be all-reduced; use mode='cumulative' under DDP"
            )
        self.flush()
        if self.element_se:
            for name in self.g2_sum:
                local = _moments(self.units, self.g2_sum[name], self.g2_m2[name])
                self.g2_m2[name] = all_reduce_moments(local, group).m2
        names = list(self.g2_sum)
        tensors = [self.counts[k] for k in COUNT_KEYS] + [self.g2_sum[n] for n in names]
        tensors += [self.g_sum[n] for n in names if self.signal]
        reduced = iter(all_reduce_sum_(tensors, group))
        for key in COUNT_KEYS:
            self.counts[key] = next(reduced)
        for name in names:
            self.g2_sum[name] = next(reduced)
        for name in names if self.signal else ():
            self.g_sum[name] = next(reduced)
        for stats in (self.trace_all, self.mask_all):
            if stats is not None:
                stats.all_reduce(group)

    # ------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor view of the sufficient statistics (for files and state dicts)."""
        if self.mode != "cumulative":
            raise ConfigurationError("mode='ema' state is not saved; save a cumulative collector")
        out = {f"counts/{k}": v for k, v in self.counts.items()}
        out |= {f"g2_sum/{n}": v for n, v in self.g2_sum.items()}
        out |= {f"g_sum/{n}": v for n, v in self.g_sum.items()}
        out |= {f"g2_m2/{n}": v for n, v in self.g2_m2.items()}
        for label, stats in (("trace", self.trace), ("mask", self.mask)):
            for fam, view in stats.items():
                for key, value in view.tensors().items():
                    out[f"{label}/{fam}/{key}"] = value
        return out

    # ------------------------------------------------------ per-family views
    def _views(self, stats: RunningMoments | None) -> dict[str, FamilyMoments]:
        out: dict[str, FamilyMoments] = {}
        if stats is None:
            return out
        self.flush()
        start = 0
        for fam, size in self.families:
            out[fam] = FamilyMoments(stats, start, start + size)
            start += size
        return out

    @property
    def trace(self) -> dict[str, FamilyMoments]:
        """{family: moments of its per-unit group traces} (views of ``trace_all``)."""
        return self._views(self.trace_all)

    @property
    def mask(self) -> dict[str, FamilyMoments]:
        """{family: moments of its per-unit mask values} (views of ``mask_all``)."""
        return self._views(self.mask_all)

    def load_tensors(self, tensors: Mapping[str, object], where: str = "saved state") -> None:
        """Inverse of :meth:`tensors` (see :func:`gradstats.fisher._state_load.load_tensors`).

        Raises:
            StateError: naming the entry and what is wrong with it; nothing is changed.
        """
        load_tensors(self, tensors, where)
