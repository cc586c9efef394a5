"""The scaler's configuration: every default is defined here, once, and validated."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from gradstats._validation import check_choice, check_open_unit, check_positive_int
from gradstats._warnings import warn
from gradstats.errors import ConfigurationError, ConfigurationTypeError, check_nonfinite
from gradstats.scaling._rules import batch_scale, check_rule_settings
from gradstats.scaling._statistic import (
    AUTO,
    STATISTICS,
    check_statistic_name,
    get_statistic,
    over_time,
    registered_statistics,
    resolve_statistic,
)

__all__ = ["AGGREGATES", "APPLY_TO", "STATISTICS", "UNITS", "ScalerConfig", "one_config"]

UNITS = ("sample", "token")
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

    The defaults are the variant that did not lose to the unscaled baseline in any experiment
    of the README: ``statistic="auto"`` and ``rule="adascale"`` at S = 1.

    ``statistic`` is ``"auto"`` (default) or a name from
    :func:`~gradstats.scaling.registered_statistics`. ``"auto"`` is resolved when the scaler is
    built (:meth:`resolved`): ``"per_sample"`` when ``model=`` is given (exact same-point noise
    from one backward), else ``"same_point"`` (unbiased; needs ≥ 2 micro-batches or DDP ranks
    per step, and warns once when it never gets an estimate). It never resolves to
    ``"temporal"``, which counts parameter drift as noise and along training reads "no
    detectable signal". The scaler's ``config``, ``statistics()``, reports and checkpoints hold
    the resolved name.

    ``unit`` (``statistic="per_sample"`` only): ``"sample"`` (a sequence is one unit) or
    ``"token"`` (every position is a unit).

    ``rule`` is a name from :func:`~gradstats.scaling.registered_rules`. ``"adascale"``
    (default) is AdaScale's gain r for a batch S times the one the lr was tuned for:
    ``scale`` = S, or S = ``batch_size / base_batch_size``; with neither ``scale`` nor
    ``base_batch_size``, S = 1 and r = 1 exactly — the step is the unscaled baseline's (it
    never loses to itself) while the scaler measures and reports ρ, B_noise, its standard
    error and (with ``batch_size``) ``suggested_batch_size``; ``vgs.progress`` advances by 1
    per step. ``"shrink"`` (the original's, and the default before; no experiment showed it
    beating a tuned constant lr) is 1/(1 + αρ) with ``alpha`` and ``min_scale``: with
    ``min_scale=0`` (default) "no detectable signal" keeps the previous factor, never a zero
    step. ``statistic="temporal", rule="shrink"`` is the former default, unchanged.
    ``rule="adascale"`` at S ≠ 1 driven by ``statistic="temporal"`` (or a diagnostic) warns (at
    "no detectable signal" the gain goes to S).

    Every float must be finite: ``alpha``, ``eps``, ``max_rate`` and ``confidence`` in
    [0, ∞), ``min_scale`` in [0, 1], ``beta`` in (0, 1).

    >>> ScalerConfig(alpha=float("inf"))
    Traceback (most recent call last):
    ...
    gradstats.errors.ConfigurationError: alpha must lie in [0.0, inf) and finite; got inf
    """

    statistic: str = AUTO
    unit: str = "sample"
    rule: str = "adascale"
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
    base_batch_size: int | None = None
    scale: float | None = None
    log_every: int = 100
    max_nonfinite_steps: int | None = 100
    nonfinite: str = "skip"

    def __post_init__(self) -> None:
        check_statistic_name(self.statistic)  # "auto" or the registry: an error naming them
        check_choice("unit", self.unit, UNITS)
        candidates = (
            {resolve_statistic(AUTO, model) for model in (True, False)}
            if self.statistic == AUTO
            else {self.statistic}
        )
        if not any(self.unit in get_statistic(name).units for name in candidates):
            _refuse_unit(self.unit, f"statistic={self.statistic!r}")
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
        check_rule_settings(self)
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

    def resolved(self, model: object = None) -> ScalerConfig:
        """This configuration with ``statistic="auto"`` resolved (``"per_sample"`` when
        ``model`` is given, else ``"same_point"``; other statistics stay as they are). Warns
        when ``rule="adascale"`` at S ≠ 1 is driven by ``statistic="temporal"`` or a
        diagnostic (a variance over steps).

        >>> ScalerConfig().resolved().statistic
        'same_point'
        >>> import torch
        >>> ScalerConfig().resolved(torch.nn.Linear(2, 1)).statistic
        'per_sample'
        """
        config = self
        if self.statistic == AUTO:
            statistic = resolve_statistic(AUTO, model is not None)
            if self.unit not in get_statistic(statistic).units:
                _refuse_unit(self.unit, f"statistic='auto' without model=, i.e. {statistic!r}")
            config = replace(self, statistic=statistic)
        if config.rule == "adascale" and over_time(config.statistic):
            scale = batch_scale(config)
            if scale != 1.0:
                warn(
                    f"rule='adascale' (S = {scale:g}) driven by statistic={config.statistic!r}: "
                    "a variance over steps counts parameter drift as noise and along training "
                    "reads 'no detectable signal', where the gain goes to S (linear scaling); "
                    "drive it with a same-point statistic ('auto', 'per_sample' with model=, "
                    "or 'same_point')"
                )
        return config


def _refuse_unit(unit: str, got: str) -> None:
    takers = " or ".join(
        f"statistic={name!r}"
        for name in registered_statistics()
        if unit in get_statistic(name).units
    )
    raise ConfigurationError(
        f"unit={unit!r} is an option of {takers} (the units of the per-example gradients); "
        f"got {got}"
    )


_DEFAULTS = ScalerConfig()


def one_config(config: ScalerConfig | None, options: ScalerConfig) -> ScalerConfig:
    """``config=`` or keyword options, not both (a keyword would be silently overridden)."""
    if config is None:
        return options
    if not isinstance(config, ScalerConfig):
        raise ConfigurationTypeError(f"config must be a ScalerConfig; got {type(config).__name__}")
    given = [k for k, v in options.to_dict().items() if v != getattr(_DEFAULTS, k)]
    if given:
        raise ConfigurationError(
            f"pass the settings either as config=ScalerConfig(...) or as keywords, not both; "
            f"got config and {', '.join(given)}"
        )
    return config
