r"""The collector's float64 statistics: exact sums, Chan merges, all-reduce, debiased EMA.

Per parameter element j, over units i (samples or tokens) and passes k with weights w_k
(Σ_k w_k = 1; one pass of weight 1 for ``"empirical"``):

* ``g2_sum`` = Σ_i x_ij with x_ij = Σ_k w_k g_ikj² — the Fisher numerator. The Fisher is
  F_jj = g2_sum / N (N = number of units), exactly additive over batches, files and ranks.
* ``g_sum`` = Σ_i Σ_k w_k g_ikj — so ḡ_j = g_sum / N and, exactly, F_jj = ḡ_j² + Var_j with
  Var_j = Σ_{i,k} w_k (g_ikj − ḡ_j)² / N (the "signal", "second moment" and "variance" of
  the Fisher decomposition EF = (ḡ)² + Var).
* ``g2_m2`` (``element_se``) = Σ_i (x_ij − F_jj)², merged batch by batch with Chan's formula
  (:func:`gradstats.moments._welford.combine`), so SE(F_jj) = sqrt(g2_m2 / (N − 1) / N).
* Per family: :class:`~gradstats.moments.RunningMoments` of the per-unit group traces and mask
  values (the unit is the observation, never a batch weighted by its token count).

In ``mode="ema"`` the batch means replace the sums: :class:`~gradstats.moments.EMAMoments`
(zero-initialised, divided by 1 − β^k, so a constant input reads exactly that constant) of the
per-batch mean of x_ij, of ḡ and of the group mask values.

Non-finite batches (any statistic: Σg², Σg⁴, Σg, group rows) are rejected on the device (``ok``
flag): nothing changes but ``rejected``. In ``mode="ema"`` a batch without units (``unit="token"``,
no active target) is skipped too: it has no mean to average in.
"""

from __future__ import annotations

import torch

from gradstats.moments import EMAMoments, RunningMoments
from gradstats.moments._distributed import all_reduce_moments, all_reduce_sum_
from gradstats.moments._welford import Moments, combine, safe_inverse

__all__ = ["COUNT_KEYS", "FisherState"]

COUNT_KEYS = ("samples", "tokens", "batches", "rejected", "draw_weight_sq")


def _accepted(ok: torch.Tensor) -> bool | None:
    """On the CPU the batch flag is read (free: there is no device to wait for), which skips
    the masking work of an accepted batch; elsewhere None: mask on the device, never sync."""
    return bool(ok) if ok.device.type == "cpu" else None  # sync-ok: CPU only


def _masked_add_(target: torch.Tensor, value: torch.Tensor, ok: torch.Tensor, accepted) -> None:
    if accepted is None:
        target.add_(torch.where(ok, value, 0.0))
    elif accepted:
        target.add_(value)


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
        f64 = {"dtype": torch.float64, "device": device}
        self.counts = {key: torch.zeros((), **f64) for key in COUNT_KEYS}
        if mode == "cumulative":
            self.g2_sum = {n: torch.zeros(s, **f64) for n, s in shapes.items()}
            self.g_sum = {n: torch.zeros(s, **f64) for n, s in shapes.items()} if signal else {}
            self.g2_m2 = {n: torch.zeros(s, **f64) for n, s in shapes.items()} if element_se else {}
            self.trace = {f: RunningMoments((g,), device=device) for f, g in families}
            self.mask = {f: RunningMoments((g,), device=device) for f, g in families}
        else:
            ema = {"dtype": torch.float64, "device": device}
            self.g2_ema = {n: EMAMoments(beta, s, **ema) for n, s in shapes.items()}
            self.g_ema = (
                {n: EMAMoments(beta, s, **ema) for n, s in shapes.items()} if signal else {}
            )
            self.mask_ema = {f: EMAMoments(beta, (g,), **ema) for f, g in families}

    # ----------------------------------------------------------------- update
    @property
    def units(self) -> torch.Tensor:
        return self.counts["samples" if self.unit == "sample" else "tokens"]

    def update(
        self,
        ok: torch.Tensor,
        n_units: torch.Tensor,
        n_samples: int,
        n_tokens: torch.Tensor,
        draw_weight_sq: float,
        sq: dict[str, torch.Tensor],
        sq4: dict[str, torch.Tensor] | None,
        g_sum: dict[str, torch.Tensor],
        trace_rows: dict[str, torch.Tensor],
        mask_rows: dict[str, torch.Tensor],
        row_weight: torch.Tensor | None = None,
    ) -> None:
        """Fold one batch in (every argument on the state's device; nothing read to the host).

        ``row_weight`` ([rows], 0 or 1; None: all 1) marks which rows of the per-unit group
        values are units (token units: the positions with an active target)."""
        okf = ok.to(torch.float64)
        n_units = n_units.to(torch.float64)
        if self.mode == "cumulative" and self.element_se:
            for name, total in sq.items():
                total = total.to(torch.float64)
                old = _moments(self.units, self.g2_sum[name], self.g2_m2[name])
                mean_b = total * safe_inverse(n_units)
                m2_b = (sq4[name].to(torch.float64) - total * mean_b).clamp_(min=0.0)
                merged = combine(old, _moments(n_units, total, m2_b))
                self.g2_m2[name] = torch.where(ok, merged.m2, self.g2_m2[name])
        if self.mode == "cumulative":
            accepted = _accepted(ok)
            for name, total in sq.items():
                _masked_add_(self.g2_sum[name], total, ok, accepted)
            for name, total in g_sum.items():
                _masked_add_(self.g_sum[name], total, ok, accepted)
            units = None if row_weight is None else row_weight > 0  # no host sync (no indexing)
            for stats, per_unit in ((self.trace, trace_rows), (self.mask, mask_rows)):
                for fam, rows in per_unit.items():  # a rejected batch is counted there
                    stats[fam].update(rows, mask=units, accept=ok)
        else:
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
        counts = self.counts
        counts["samples"] += okf * n_samples
        counts["tokens"] += okf * n_tokens.to(torch.float64)
        counts["batches"] += okf
        counts["rejected"] += 1.0 - okf
        counts["draw_weight_sq"] += okf * draw_weight_sq * n_units

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
            raise ValueError(
                "mode='ema' summaries do not merge: an EMA weights batches by arrival time; "
                "use mode='cumulative' to merge collectors"
            )
        for name in self.g2_sum:
            if self.element_se:
                mine = _moments(self.units, self.g2_sum[name], self.g2_m2[name])
                theirs = _moments(other.units, other.g2_sum[name], other.g2_m2[name])
                self.g2_m2[name] = combine(mine, theirs).m2
            self.g2_sum[name] += other.g2_sum[name].to(self.device)
            if self.signal:
                self.g_sum[name] += other.g_sum[name].to(self.device)
        for fam in self.trace:
            self.trace[fam].merge(other.trace[fam])
            self.mask[fam].merge(other.mask[fam])
        for key in COUNT_KEYS:
            self.counts[key] += other.counts[key].to(self.device)

    def all_reduce(self, group: object | None = None) -> None:
        if self.mode != "cumulative":
            raise ValueError(
                "mode='ema' summaries cannot be all-reduced; use mode='cumulative' under DDP"
            )
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
        for fam in self.trace:
            self.trace[fam].all_reduce(group)
            self.mask[fam].all_reduce(group)

    # ------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor view of the sufficient statistics (for files and state dicts)."""
        if self.mode != "cumulative":
            raise ValueError("mode='ema' state is not saved; save a cumulative collector")
        out = {f"counts/{k}": v for k, v in self.counts.items()}
        out |= {f"g2_sum/{n}": v for n, v in self.g2_sum.items()}
        out |= {f"g_sum/{n}": v for n, v in self.g_sum.items()}
        out |= {f"g2_m2/{n}": v for n, v in self.g2_m2.items()}
        for fam in self.trace:
            for label, rm in (("trace", self.trace[fam]), ("mask", self.mask[fam])):
                state = rm.state_dict()
                for key in ("count", "weight_sum", "weight_sq_sum", "mean", "m2", "rejected"):
                    out[f"{label}/{fam}/{key}"] = state[key]
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`tensors`; validates every key and shape before changing anything."""
        expected = self.tensors()
        missing = [k for k in expected if k not in tensors]
        if missing:
            raise ValueError(f"saved state lacks {len(missing)} entries, e.g. {missing[0]!r}")
        for key, value in expected.items():
            if tuple(tensors[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"saved state {key!r} has shape {tuple(tensors[key].shape)}; expected "
                    f"{tuple(value.shape)}"
                )
        for key in list(expected):
            value = tensors[key].to(self.device)
            kind, _, rest = key.partition("/")
            if kind in ("trace", "mask"):
                continue
            store = {"counts": self.counts, "g2_sum": self.g2_sum, "g_sum": self.g_sum}
            store["g2_m2"] = self.g2_m2
            store[kind][rest] = value.to(torch.float64)
        for fam in self.trace:
            for label, rm in (("trace", self.trace[fam]), ("mask", self.mask[fam])):
                state = rm.state_dict()
                for key in ("count", "weight_sum", "weight_sq_sum", "mean", "m2", "rejected"):
                    state[key] = tensors[f"{label}/{fam}/{key}"]
                rm.load_state_dict(state)
