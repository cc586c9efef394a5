"""The scaler's configuration: every default is defined here, once, and validated."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from gradstats._validation import check_choice, check_open_unit, check_positive_int
from gradstats.errors import ConfigurationError, ConfigurationTypeError, check_nonfinite

__all__ = ["AGGREGATES", "APPLY_TO", "STATISTICS", "ScalerConfig"]

STATISTICS = ("temporal", "same_point", "tensor_mean", "mixed", "spatial")
APPLY_TO = ("grad", "lr")
AGGREGATES = ("global", "param_group", "tensor")


def _check_number(name: str, value: object, low: float, high: float) -> float:
    """A finite real number in [low, high] (inf and NaN are never valid settings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationTypeError(f"{name} must be a number; got {type(value).__name__}")
    if not math.isfinite(value) or not (low <= value <= high):
        span = f"[{low}, {high}]" if math.isfinite(high) else f"[{low}, inf) and finite"
        raise ConfigurationError(f"{name} must lie in {span}; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ScalerConfig:
    """Settings of :class:`VarianceGradientScaler` (see its docstring for their meaning).

    Every float must be finite: ``alpha``, ``eps``, ``max_rate`` and ``confidence`` in
    [0, ∞), ``min_scale`` in [0, 1], ``beta`` in (0, 1).

    >>> ScalerConfig(alpha=float("inf"))
    Traceback (most recent call last):
    ...
    gradstats.errors.ConfigurationError: alpha must lie in [0.0, inf) and finite; got inf
    """

    statistic: str = "temporal"
    alpha: float = 1.0
    beta: float = 0.99
    eps: float = 0.0
    warmup_steps: int = 0
    min_scale: float = 0.0
    max_rate: float | None = None
    apply_to: str = "grad"
    aggregate: str = "global"
    confidence: float | None = 0.5
    enabled: bool = True
    foreach: bool = True
    batch_size: int | None = None
    log_every: int = 100
    max_nonfinite_steps: int | None = 100
    nonfinite: str = "skip"

    def __post_init__(self) -> None:
        check_choice("statistic", self.statistic, STATISTICS)
        check_choice("apply_to", self.apply_to, APPLY_TO)
        check_choice("aggregate", self.aggregate, AGGREGATES)
        check_nonfinite("nonfinite", self.nonfinite)
        _check_number("alpha", self.alpha, 0.0, math.inf)
        check_open_unit("beta", self.beta)
        _check_number("eps", self.eps, 0.0, math.inf)
        check_positive_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_number("min_scale", self.min_scale, 0.0, 1.0)
        if self.max_rate is not None:
            _check_number("max_rate", self.max_rate, 0.0, math.inf)
        if self.confidence is not None:
            _check_number("confidence", self.confidence, 0.0, math.inf)
        for name in ("enabled", "foreach"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationTypeError(f"{name} must be a bool; got {getattr(self, name)!r}")
        if self.batch_size is not None:
            check_positive_int("batch_size", self.batch_size)
        check_positive_int("log_every", self.log_every)
        if self.max_nonfinite_steps is not None:
            check_positive_int("max_nonfinite_steps", self.max_nonfinite_steps)
        if self.apply_to == "lr" and self.aggregate == "tensor":
            raise ConfigurationError(
                "apply_to='lr' scales each param group's learning rate, so aggregate must be "
                "'global' or 'param_group'; got aggregate='tensor' (use apply_to='grad')"
            )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
