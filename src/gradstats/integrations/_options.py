"""Keyword arguments a callback forwards to a gradstats object, checked when it is built."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping

from gradstats.errors import ConfigurationTypeError

__all__ = ["check_forwarded"]


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
