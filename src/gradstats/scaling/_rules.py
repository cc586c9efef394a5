r"""Rules: how the measured noise becomes the step's factor (``rule=``), in a registry.

ρ = tr Cov(ĝ) / ‖E ĝ‖² is the inverse signal-to-noise ratio of the applied gradient ĝ, the mean
over a batch of B samples; B_noise = ρ·B is the simple noise scale tr Σ / ‖G‖² of McCandlish et
al. (2018), with Σ the per-sample covariance. A rule maps ρ (a device vector, one entry per
aggregate; ``inf`` when there is no detectable signal) to a factor f that multiplies the step
(gradients or learning rates, ``apply_to``). The scaler keeps f = 1 while the estimate is
missing or gated (warm-up, confidence), for every rule.

* ``"shrink"`` — the original scaler's f = 1 / (1 + αρ), bounded to [``min_scale``, 1]. It is the
  MSE-optimal shrinkage of a noisy gradient and McCandlish et al.'s ε_opt(B)/ε_max **only if the
  base learning rate is ε_max, the optimum for an infinitely large batch**. A learning rate tuned
  at batch B already contains that factor: shrinking it again divides it by 1 + αρ (10 to 60 at
  small batches in our experiments). No detectable signal (ρ = ∞) gives ``min_scale`` when it is
  positive and otherwise keeps the previous factor: never a zero step by default.
* ``"adascale"`` — AdaScale's gain (Johnson et al., 2020; FairScale's ``AdaScale``) for a batch
  S times the one the learning rate was tuned for. With σ² the noise of a base-batch gradient and
  μ² = ‖G‖², r = (σ² + μ²)/(σ²/S + μ²); the applied batch being S× the base, σ²/μ² = Sρ, so

      r = (1 + Sρ)/(1 + ρ) = (1 + B_noise/B_base)/(1 + B_noise/B),

  between 1 (noise-free: the big batch gains nothing) and S (pure noise: linear scaling).
  No detectable signal gives S. Each applied step advances the scaler's progress clock τ by r
  (``vgs.progress``), so a schedule written for the base batch runs unchanged as lr(τ).
  It is the default rule. S is ``scale``, or ``batch_size / base_batch_size``; with neither
  ``scale`` nor ``base_batch_size`` S = 1, where r = 1 exactly (bitwise: the step is the
  unscaled baseline's, the scaler only measures and reports) and τ counts the steps.

A new rule is a class with ``name``, ``from_config(config)`` and ``factor(rho, previous)``,
registered with :func:`register_rule`.
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol

import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = [
    "AdaScaleRule",
    "Rule",
    "RuleSettings",
    "ShrinkRule",
    "factor_bounds",
    "make_rule",
    "register_rule",
    "registered_rules",
]


class RuleSettings(Protocol):
    """The configuration fields rules read (:class:`~gradstats.scaling.ScalerConfig` has them)."""

    @property
    def rule(self) -> str: ...
    @property
    def alpha(self) -> float: ...
    @property
    def min_scale(self) -> float: ...
    @property
    def scale(self) -> float | None: ...
    @property
    def base_batch_size(self) -> int | None: ...
    @property
    def batch_size(self) -> int | None: ...
    @property
    def max_rate(self) -> float | None: ...


class Rule(Protocol):
    """Turns ρ into a factor. ``factor`` sees ρ >= 0 (``inf``: no detectable signal) and the
    previous factor of each aggregate, and returns the new factors (device vectors, float64,
    no host sync)."""

    name: ClassVar[str]

    @classmethod
    def from_config(cls, config: RuleSettings) -> Rule: ...

    def factor(self, rho: torch.Tensor, previous: torch.Tensor) -> torch.Tensor: ...


def factor_bounds(rule: Rule) -> tuple[float, float] | None:
    """The interval a rule's factors lie in (``bounds()``, optional for custom rules)."""
    bounds = getattr(rule, "bounds", None)
    return bounds() if callable(bounds) else None


class ShrinkRule:
    """f = 1/(1 + αρ) in [min_scale, 1]; see the module docstring for its assumption."""

    name: ClassVar[str] = "shrink"

    def __init__(self, alpha: float, min_scale: float) -> None:
        self.alpha, self.min_scale = alpha, min_scale

    @classmethod
    def from_config(cls, config: RuleSettings) -> ShrinkRule:
        return cls(config.alpha, config.min_scale)

    def bounds(self) -> tuple[float, float]:
        return (0.0, 1.0)

    def factor(self, rho: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0:
            return torch.ones_like(rho)
        shrunk = (1.0 + self.alpha * rho).reciprocal().clamp(min=self.min_scale, max=1.0)
        if self.min_scale > 0:
            return shrunk
        return torch.where(torch.isinf(rho), previous, shrunk)


class AdaScaleRule:
    """r = (1 + Sρ)/(1 + ρ), in [min(1, S), max(1, S)]; S = ``scale``."""

    name: ClassVar[str] = "adascale"

    def __init__(self, scale: float) -> None:
        self.scale = scale

    @classmethod
    def from_config(cls, config: RuleSettings) -> AdaScaleRule:
        return cls(batch_scale(config))

    def bounds(self) -> tuple[float, float]:
        return (min(1.0, self.scale), max(1.0, self.scale))

    def factor(self, rho: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:  # r = 1 exactly, whatever ρ (also NaN): the baseline's step
            return torch.ones_like(rho)
        finite = torch.where(torch.isinf(rho), 0.0, rho.clamp(min=0.0))
        gain = (1.0 + self.scale * finite) / (1.0 + finite)
        return torch.where(torch.isinf(rho), self.scale, gain)


def constant_factor(config: RuleSettings) -> bool:
    """Whether the factor is 1 whatever the statistics: ``rule="adascale"`` at S = 1 without a
    rate limit (the default). The scaler then forms ρ and the readouts when they are read, not
    at every update (the same values: they depend on the statistics only)."""
    return config.rule == "adascale" and config.max_rate is None and batch_scale(config) == 1.0


def batch_scale(config: RuleSettings) -> float:
    """S: ``scale``, or ``batch_size / base_batch_size``, or 1 when neither ``scale`` nor
    ``base_batch_size`` is given (the lr was tuned at this batch: r = 1, the baseline's step).

    >>> from gradstats.scaling import ScalerConfig
    >>> batch_scale(ScalerConfig()), batch_scale(ScalerConfig(batch_size=64))
    (1.0, 1.0)
    >>> batch_scale(ScalerConfig(batch_size=64, base_batch_size=16))
    4.0
    """
    if config.scale is not None:
        return float(config.scale)
    if config.base_batch_size is None:
        return 1.0
    if config.batch_size is None:
        raise ConfigurationError(
            f"rule={config.rule!r} with base_batch_size={config.base_batch_size} needs the "
            "batch scale S = batch_size / base_batch_size: pass batch_size too, or scale=S"
        )
    return config.batch_size / config.base_batch_size


_RULES: dict[str, type[Rule]] = {}


def register_rule(rule: type[Rule]) -> type[Rule]:
    """Add a rule class to the registry under ``rule.name`` (usable as a class decorator).

    Raises:
        ConfigurationError: the name is taken.
    """
    name = getattr(rule, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigurationTypeError(f"a rule needs a non-empty str name; got {name!r}")
    for method in ("from_config", "factor"):
        if not callable(getattr(rule, method, None)):
            raise ConfigurationTypeError(f"rule {name!r} has no {method}()")
    if name in _RULES and _RULES[name] is not rule:
        raise ConfigurationError(f"a rule named {name!r} is already registered")
    _RULES[name] = rule
    return rule


def registered_rules() -> tuple[str, ...]:
    """The names ``rule=`` accepts."""
    return tuple(_RULES)


def make_rule(config: RuleSettings) -> Rule:
    """The rule object of a validated configuration."""
    return _RULES[config.rule].from_config(config)


def check_rule_settings(config: RuleSettings) -> None:
    """Settings that belong to one rule are refused with another (called by ScalerConfig)."""
    if config.rule not in _RULES:
        valid = ", ".join(repr(r) for r in _RULES)
        raise ConfigurationError(f"rule must be one of {valid}; got {config.rule!r}")
    if config.base_batch_size is not None:
        if isinstance(config.base_batch_size, bool) or not isinstance(config.base_batch_size, int):
            raise ConfigurationTypeError(
                f"base_batch_size must be an int; got {type(config.base_batch_size).__name__}"
            )
        if config.base_batch_size <= 0:
            raise ConfigurationError(
                f"base_batch_size must be a positive int; got {config.base_batch_size}"
            )
    if config.scale is not None:
        if isinstance(config.scale, bool) or not isinstance(config.scale, (int, float)):
            raise ConfigurationTypeError(f"scale must be a number; got {config.scale!r}")
        if not math.isfinite(config.scale) or config.scale <= 0:
            raise ConfigurationError(f"scale must be a finite number > 0; got {config.scale!r}")
        if config.base_batch_size is not None:
            raise ConfigurationError("pass scale or base_batch_size, not both")
    if config.rule == "shrink":
        if config.scale is not None or config.base_batch_size is not None:
            raise ConfigurationError(
                "scale and base_batch_size belong to rule='adascale'; rule='shrink' has none"
            )
        return
    if config.rule == "adascale":
        if config.alpha != 1.0 or config.min_scale != 0.0:
            raise ConfigurationError(
                "alpha and min_scale belong to rule='shrink'; rule='adascale' (the default) "
                "has none: pass rule='shrink' to use them"
            )
        batch_scale(config)


register_rule(ShrinkRule)
register_rule(AdaScaleRule)
