"""Host-side reports of the scaler: ``statistics()`` and the ``vgs/...`` logger metrics.

Both are functions of a :class:`~gradstats.scaling.ScalerState` and its configuration (they read
the state's public fields only). Everything here reads device values back to the host; it is only
called explicitly (or every ``log_every`` updates for the logger), never on the per-step path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradstats._warnings import warn
from gradstats.scaling._config import ScalerConfig
from gradstats.scaling._engine import totals as statistic_totals
from gradstats.scaling._factor import Aggregates, Factors
from gradstats.scaling._scaler_state import ScalerState
from gradstats.scaling._statistic import get_statistic

__all__ = ["Metrics", "TensorStatistics", "build_statistics", "log_metrics"]

# Renamed fields and logger keys: old name -> new name (deprecated aliases).
_RENAMED = {"skipped_steps": "skipped"}


@dataclass(frozen=True)
class TensorStatistics:
    """Statistics of one tensor or one aggregate, as host numbers.

    For ``temporal`` and ``same_point`` the variance and signal are means over coordinates
    (Σ_i v_i / N, ‖m‖² / N, tr Cov / N, ‖G‖² / N); aggregates report sums over their tensors.
    For the legacy diagnostics they are the diagnostic's value and the squared tensor mean.

    Attributes:
        variance: population noise (EMA-weighted variance); ``variance_unbiased``: divided by
            1 − ρ_w.  signal: squared EMA mean; ``signal_unbiased``: minus ρ_w × the unbiased
            variance (what the factor uses).
        normalized_variance: ρ = noise/signal of the applied gradient (nan: no estimate; inf: no
            detectable signal).  B_noise: ρ × batch_size (the simple noise scale
            tr Σ/‖G‖²), if ``batch_size`` is known. ``B_noise_se`` (aggregates): a conservative
            standard error, B_noise × the count-based bound sqrt(2/(n_eff − 1)) on the relative
            standard error of ρ (see ``effective_sample_size``; it ignores the averaging over
            samples and coordinates within each update, so it overstates the error of
            ``same_point``/``per_sample`` estimates; ``gradstats noise`` gives an SE over
            batches). With ``unit="token"`` pass the tokens per step as ``batch_size``.
            ``suggested_batch_size`` (aggregates): B_noise rounded, at least 1 — McCandlish et
            al.'s critical batch B_crit ≈ B_noise, where doubling the batch still nearly halves
            the steps (beyond it, mostly compute is spent); None while B_noise is not finite.
        factor: the factor applied to this tensor (aggregates: theirs).
        count: observations behind the estimate (steps with a gradient for ``temporal``;
            steps with >= 2 micro-batches for ``same_point``).
        effective_sample_size: n_eff = 1/ρ_w = 1/Σ_k w_k², how many equally weighted
            observations the EMA over ``count`` steps is worth: n_eff = t while t is small and
            it tends to (1 + β)/(1 − β) (199 at β = 0.99). It sets the precision of ρ: the
            ``confidence`` gate opens when sqrt(2/(n_eff − 1)) <= confidence (n_eff >= 9 at the
            default 0.5). Counts steps, not samples; aggregates report the smallest n_eff
            among their tensors; 0 before any observation.
        has_gradient: whether the tensor had a gradient at the last update.
        gate_open, no_estimate, no_signal, members: aggregate states (None for tensors).
        nonfinite_steps: steps whose gradients held NaN/inf; ``skipped``: steps dropped (the
            non-finite ones and those the caller skipped); ``updates``: statistics updates
            (counters: ``"global"`` only). ``skipped_steps`` is the deprecated name of
            ``skipped``. ``progress`` (``"global"`` only): the progress clock τ (see
            :attr:`~gradstats.VarianceGradientScaler.progress`).
    """

    variance: float
    variance_unbiased: float
    signal: float
    signal_unbiased: float
    normalized_variance: float
    B_noise: float | None
    factor: float
    count: int
    effective_sample_size: float
    has_gradient: bool | None = None
    gate_open: bool | None = None
    no_estimate: bool | None = None
    no_signal: bool | None = None
    members: int | None = None
    nonfinite_steps: int | None = None
    skipped: int | None = None
    updates: int | None = None
    B_noise_se: float | None = None
    suggested_batch_size: int | None = None
    progress: float | None = None

    @property
    def skipped_steps(self) -> int | None:
        """Deprecated name of :attr:`skipped`."""
        warn("TensorStatistics.skipped_steps is deprecated; use .skipped", FutureWarning)
        return self.skipped


class Metrics(dict[str, float]):
    """The ``vgs/...`` logger metrics; ``metrics["vgs/skipped_steps"]`` (renamed
    ``vgs/skipped``) still reads, with a FutureWarning, but is not among the keys."""

    def __missing__(self, key: str) -> float:
        old = key.removeprefix("vgs/")
        if key.startswith("vgs/") and old in _RENAMED:
            new = f"vgs/{_RENAMED[old]}"
            warn(f"metric {key!r} is deprecated; use {new!r}", FutureWarning)
            return self[new]
        raise KeyError(key)


def _ratio(noise: float, signal: float, eps: float, valid: bool) -> float:
    if not valid:
        return math.nan
    return noise / signal if signal > eps else math.inf


def build_statistics(state: ScalerState, config: ScalerConfig) -> dict[str, TensorStatistics]:
    """Every tensor's row, ``"global"`` and (``aggregate="param_group"``) ``"group<k>"``."""
    home = state.home
    totals = statistic_totals(state)
    numel = torch.cat([s.numel.to(home) for s in state.statistics])
    statistic = get_statistic(config.statistic)
    scale = numel if statistic.per_coordinate else torch.ones_like(numel)
    rho = totals.reliability
    unbiased = totals.noise
    rows = torch.stack(
        [
            totals.variance / scale,
            unbiased / scale,
            totals.signal_raw / scale,
            totals.signal / scale,
            totals.count.to(torch.float64),
            torch.where(totals.count > 0, 1.0 / rho, 0.0),
            state.present.to(torch.float64),
            state.factor_per_tensor,
            unbiased,
            totals.signal,
        ]
    ).cpu()  # sync-ok: statistics() is an explicit host read
    eps, batch = config.eps, config.batch_size
    min_count = statistic.min_count
    out: dict[str, TensorStatistics] = {}
    for j, name in enumerate(state.layout.names):
        col = rows[:, j].tolist()  # sync-ok: already on the host
        ratio = _ratio(col[8], col[9], eps, col[4] >= min_count)
        out[name] = TensorStatistics(
            variance=col[0], variance_unbiased=col[1], signal=col[2], signal_unbiased=col[3],
            normalized_variance=ratio, B_noise=None if batch is None else ratio * batch,
            factor=col[7], count=int(col[4]), effective_sample_size=col[5],
            has_gradient=bool(col[6]),
        )  # fmt: skip
    if state.overall is not None:
        out["global"] = _aggregate_row(state, state.overall, 0, batch, counters=True)
        if config.aggregate == "param_group" and state.readout is not None:
            for g in range(state.groups):
                out[f"group{g}"] = _aggregate_row(state, state.readout, g, batch, counters=False)
    return out


def _aggregate_row(
    state: ScalerState,
    result: tuple[Aggregates, Factors],
    g: int,
    batch: int | None,
    counters: bool,
) -> TensorStatistics:
    summed, factors = result
    columns = [
        summed.noise, summed.signal, factors.rho, factors.factor, summed.count, summed.members,
        factors.effective_sample_size, factors.gate_open, factors.no_estimate, factors.no_signal,
        factors.rel_se,
    ]  # fmt: skip
    values = torch.stack([c[g].to(torch.float64) for c in columns]).cpu().tolist()  # sync-ok
    noise, signal, rho, factor, count, members, n_eff, gate_open, no_estimate, no_signal = values[
        :10
    ]
    rho = math.nan if no_estimate else rho
    b_noise = None if batch is None else rho * batch
    b_noise_se = suggested = None
    if b_noise is not None and math.isfinite(b_noise):
        b_noise_se = b_noise * values[10]
        suggested = max(1, round(b_noise))
    nonfinite = skipped = updates = None
    progress = None
    if counters:
        counts = torch.stack(
            [state.nonfinite.double(), state.skipped.double(), state.progress]
        ).cpu()  # sync-ok: statistics() is an explicit host read
        nonfinite, skipped, updates = int(counts[0]), int(counts[1]), state.updates
        progress = float(counts[2])
    return TensorStatistics(
        variance=noise, variance_unbiased=noise, signal=signal, signal_unbiased=signal,
        normalized_variance=rho, B_noise=b_noise, factor=factor,
        count=int(count), effective_sample_size=n_eff, gate_open=bool(gate_open),
        no_estimate=bool(no_estimate), no_signal=bool(no_signal), members=int(members),
        nonfinite_steps=nonfinite, skipped=skipped, updates=updates, B_noise_se=b_noise_se,
        suggested_batch_size=suggested, progress=progress,
    )  # fmt: skip


def log_metrics(state: ScalerState, config: ScalerConfig) -> Metrics:
    """The ``vgs/...`` metrics handed to the logger callback (one host read)."""
    stats = build_statistics(state, config)
    overall = stats["global"]
    metrics = Metrics(
        {
            "vgs/factor": overall.factor,
            "vgs/rho": overall.normalized_variance,
            "vgs/noise": overall.variance_unbiased,
            "vgs/signal": overall.signal_unbiased,
            "vgs/effective_sample_size": overall.effective_sample_size,
            "vgs/gate_open": float(bool(overall.gate_open)),
            "vgs/no_signal": float(bool(overall.no_signal)),
            "vgs/nonfinite_steps": float(overall.nonfinite_steps or 0),
            "vgs/skipped": float(overall.skipped or 0),
            "vgs/progress": float(overall.progress or 0.0),
        }
    )
    if overall.B_noise is not None:
        metrics["vgs/B_noise"] = overall.B_noise
    if overall.B_noise_se is not None:
        metrics["vgs/B_noise_se"] = overall.B_noise_se
    if overall.suggested_batch_size is not None:
        metrics["vgs/suggested_batch_size"] = float(overall.suggested_batch_size)
    for name, row in stats.items():
        if name.startswith("group"):
            metrics[f"vgs/factor/{name}"] = row.factor
    return metrics
