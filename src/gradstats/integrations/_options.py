"""Keyword arguments a callback forwards to a gradstats object, checked when it is built."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gradstats.errors import ConfigurationTypeError
from gradstats.scaling._config import ScalerConfig
from gradstats.scaling._statistic import takes_model

__all__ = ["check_forwarded", "with_model"]


def check_forwarded(
    target: Callable[..., object], kwargs: Mapping[str, object], reserved: Iterable[str] = ()
) -> None:
    """Raise a ``ConfigurationTypeError`` (a ``TypeError``) naming every key of ``kwargs`` that
    ``target`` does not accept (or that the callback sets itself: ``reserved``), so a typo fails
    before training starts."""
    accepted = set(inspect.signature(target).parameters) - set(reserved)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigurationTypeError(
            f"unknown {getattr(target, '__name__', target)} argument(s) {unknown}; "
            f"valid: {', '.join(sorted(accepted))}"
        )


def with_model(kwargs: Mapping[str, Any], model: object) -> dict[str, Any]:
    """``kwargs`` for a :class:`~gradstats.VarianceGradientScaler` with ``model=`` added when its
    statistic uses one: the default ``statistic="auto"`` then resolves to ``"per_sample"`` (the
    exact noise of each backward) instead of ``"same_point"``. A ``model`` already given is
    kept; a statistic without modules (``"temporal"``, ``"same_point"``, ...) gets none."""
    options = dict(kwargs)
    config = options.get("config")
    statistic = (
        config.statistic
        if isinstance(config, ScalerConfig)
        else options.get("statistic", ScalerConfig.statistic)
    )
    if "model" not in options and takes_model(statistic):
        options["model"] = model
    return options
