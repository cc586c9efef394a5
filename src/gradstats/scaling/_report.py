"""Host-side reports of the scaler: ``statistics()`` and the ``vgs/...`` logger metrics.

Everything here reads device values back to the host; it is only called explicitly (or every
``log_every`` updates for the logger), never on the per-step path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gradstats.scaling._scaler import VarianceGradientScaler

__all__ = ["TensorStatistics", "build_statistics", "log_metrics"]


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
            detectable signal).  B_noise: ρ × batch_size (the simple noise scale), if known.
        factor: the factor applied to this tensor (aggregates: theirs).
        count: observations behind the estimate; ``effective_sample_size``: 1/ρ_w.
        has_gradient: whether the tensor had a gradient at the last update.
        gate_open, no_estimate, no_signal, members: aggregate states (None for tensors).
        nonfinite_steps, skipped_steps, updates: counters (``"global"`` only).
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
    skipped_steps: int | None = None
    updates: int | None = None


def _ratio(noise: float, signal: float, eps: float, valid: bool) -> float:
    if not valid:
        return math.nan
    return noise / signal if signal > eps else math.inf


def build_statistics(scaler: VarianceGradientScaler) -> dict[str, TensorStatistics]:
    home = scaler._home
    totals = scaler._totals()
    numel = torch.cat([s.numel.to(home) for s in scaler._states])
    per_coordinate = scaler.config.statistic in ("temporal", "same_point")
    scale = numel if per_coordinate else torch.ones_like(numel)
    rho = totals["reliability"]
    unbiased = totals["noise"]
    population = totals["variance"]
    rows = torch.stack(
        [
            population / scale,
            unbiased / scale,
            totals["signal_raw"] / scale,
            totals["signal"] / scale,
            totals["count"].to(torch.float64),
            torch.where(totals["count"] > 0, 1.0 / rho, 0.0),
            scaler._present.to(torch.float64),
            scaler._factor_per_tensor,
            unbiased,
            totals["signal"],
        ]
    ).cpu()  # sync-ok: statistics() is an explicit host read
    eps, batch = scaler.config.eps, scaler.config.batch_size
    min_count = scaler._states[0].min_count
    out: dict[str, TensorStatistics] = {}
    for j, name in enumerate(scaler.layout.names):
        col = rows[:, j].tolist()  # sync-ok: already on the host
        ratio = _ratio(col[8], col[9], eps, col[4] >= min_count)
        out[name] = TensorStatistics(
            variance=col[0], variance_unbiased=col[1], signal=col[2], signal_unbiased=col[3],
            normalized_variance=ratio, B_noise=None if batch is None else ratio * batch,
            factor=col[7], count=int(col[4]), effective_sample_size=col[5],
            has_gradient=bool(col[6]),
        )  # fmt: skip
    if scaler._global is not None:
        out["global"] = _aggregate_row(scaler, scaler._global, 0, batch, counters=True)
        if scaler.config.aggregate == "param_group":
            for g in range(scaler._groups):
                out[f"group{g}"] = _aggregate_row(scaler, scaler._result, g, batch, counters=False)
    return out


def _aggregate_row(
    scaler, result: dict, g: int, batch: int | None, counters: bool
) -> TensorStatistics:
    keys = ("noise", "signal", "rho", "factor", "count", "members", "effective_sample_size")
    flags = ("gate_open", "no_estimate", "no_signal")
    values = (
        torch.stack([result[k][g].to(torch.float64) for k in keys + flags])
        .cpu()
        .tolist()  # sync-ok
    )  # sync-ok
    v = dict(zip(keys + flags, values, strict=True))
    rho = math.nan if v["no_estimate"] else v["rho"]
    factor = v["factor"]
    extra = {}
    if counters:
        counts = torch.stack([scaler._nonfinite, scaler._skipped]).cpu().tolist()  # sync-ok
        extra = {
            "nonfinite_steps": counts[0],
            "skipped_steps": counts[1],
            "updates": scaler.updates,
        }
    return TensorStatistics(
        variance=v["noise"], variance_unbiased=v["noise"], signal=v["signal"],
        signal_unbiased=v["signal"], normalized_variance=rho,
        B_noise=None if batch is None else rho * batch, factor=factor, count=int(v["count"]),
        effective_sample_size=v["effective_sample_size"], gate_open=bool(v["gate_open"]),
        no_estimate=bool(v["no_estimate"]), no_signal=bool(v["no_signal"]),
        members=int(v["members"]), **extra,
    )  # fmt: skip


def log_metrics(scaler: VarianceGradientScaler) -> dict[str, float]:
    """The ``vgs/...`` metrics handed to the logger callback."""
    stats = build_statistics(scaler)
    overall = stats["global"]
    metrics = {
        "vgs/factor": overall.factor,
        "vgs/rho": overall.normalized_variance,
        "vgs/noise": overall.variance_unbiased,
        "vgs/signal": overall.signal_unbiased,
        "vgs/effective_sample_size": overall.effective_sample_size,
        "vgs/gate_open": float(overall.gate_open),
        "vgs/no_signal": float(overall.no_signal),
        "vgs/nonfinite_steps": float(overall.nonfinite_steps),
        "vgs/skipped_steps": float(overall.skipped_steps),
    }
    if overall.B_noise is not None:
        metrics["vgs/B_noise"] = overall.B_noise
    for name, row in stats.items():
        if name.startswith("group"):
            metrics[f"vgs/factor/{name}"] = row.factor
    return metrics
