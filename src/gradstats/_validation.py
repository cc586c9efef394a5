"""Argument checks shared by every pillar.

Each check raises a :class:`~gradstats.errors.ConfigurationError` (a ``ValueError``) or a
:class:`~gradstats.errors.ConfigurationTypeError` (also a ``TypeError``) whose message names the
argument and the valid values; :func:`check_state_header` raises a
:class:`~gradstats.errors.StateError`. None of them reads tensor *values* (that would be a
host sync); they look at Python scalars and tensor metadata only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError, StateError

__all__ = [
    "check_choice",
    "check_floating",
    "check_open_unit",
    "check_positive_int",
    "check_shape",
    "check_state_header",
    "normalize_shape",
]


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise raise a ``ValueError``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ConfigurationError(f"{name} must be one of {valid}; got {value!r}")
    return value


def check_open_unit(name: str, value: object) -> float:
    """Return ``value`` as a float if it lies in the open interval (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationTypeError(
            f"{name} must be a float in (0, 1); got {type(value).__name__}"
        )
    if not (0.0 < float(value) < 1.0) or math.isnan(value):
        raise ConfigurationError(f"{name} must lie in the open interval (0, 1); got {value!r}")
    return float(value)


def check_positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationTypeError(
            f"{name} must be an int >= {minimum}; got {type(value).__name__}"
        )
    if value < minimum:
        raise ConfigurationError(f"{name} must be an int >= {minimum}; got {value}")
    return value


def normalize_shape(name: str, shape: object) -> tuple[int, ...]:
    """Turn an int, a sequence of ints or a ``torch.Size`` into a tuple of non-negative ints."""
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        raise ConfigurationTypeError(f"{name} must be a tuple of ints; got {type(shape).__name__}")
    dims = tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ConfigurationError(f"{name} must be a tuple of non-negative ints; got {shape!r}")
    return dims


def check_floating(name: str, tensor: object) -> torch.Tensor:
    """Return ``tensor`` if it is a real floating-point tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise ConfigurationTypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ConfigurationTypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32, float64); "
            f"got {tensor.dtype}"
        )
    return tensor


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    """Raise a ``ValueError`` unless ``tensor.shape`` equals ``expected``."""
    if tuple(tensor.shape) != tuple(expected):
        raise ConfigurationError(
            f"{name} must have shape {what} = {tuple(expected)}; got {tuple(tensor.shape)}"
        )


def check_state_header(state_dict: object, fmt: str, version: int) -> dict:
    """Check the ``format`` and ``version`` keys every gradstats state dict carries."""
    if not isinstance(state_dict, dict) or state_dict.get("format") != fmt:
        found = state_dict.get("format") if isinstance(state_dict, dict) else type(state_dict)
        raise StateError(f"state_dict is not a {fmt} state dict (format: {found!r})")
    if state_dict.get("version") != version:
        raise StateError(
            f"state_dict has version {state_dict.get('version')!r}; this gradstats reads "
            f"version {version}"
        )
    return state_dict
