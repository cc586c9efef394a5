"""Checks shared by the moment classes: devices, dtypes and loaded states.

Loading a state dict is not a hot path, so :func:`state_tensor` reads tensor *values* (finite,
non-negative, whole) on the host; every check raises a :class:`~gradstats.errors.StateError`
naming the key, before the caller changes anything.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gradstats._validation import check_floating
from gradstats.errors import ConfigurationError, ConfigurationTypeError, StateError

__all__ = [
    "check_state_dtype",
    "check_update_arguments",
    "renamed_key",
    "state_shape",
    "state_tensor",
]


def check_state_dtype(dtype: object) -> torch.dtype:
    """Return ``dtype`` if it is a floating ``torch.dtype``."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigurationTypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
    return dtype


def check_update_arguments(
    x: object,
    shape: tuple[int, ...],
    weight: object,
    mask: object,
    accept: object,
) -> None:
    """The metadata checks of ``RunningMoments.update`` (no tensor values are read)."""
    x = check_floating("x", x)
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise ConfigurationError(
            f"x must have shape [n, *shape] = [n, {', '.join(map(str, shape))}]; "
            f"got {tuple(x.shape)}"
        )
    if weight is not None:
        check_floating("weight", weight)
    for name, rows in (("weight", weight), ("mask", mask)):
        if rows is None:
            continue
        if not isinstance(rows, torch.Tensor):
            raise ConfigurationTypeError(f"{name} must be a tensor; got {type(rows).__name__}")
        if tuple(rows.shape) != (x.shape[0],):
            raise ConfigurationError(
                f"{name} must have shape [n] = [{x.shape[0]}] (one {name} per row of x); "
                f"got {tuple(rows.shape)}"
            )
        if rows.device != x.device:
            raise ConfigurationError(f"{name} is on {rows.device} but x is on {x.device}")
        if name == "mask" and rows.dtype != torch.bool:
            raise ConfigurationTypeError(f"mask must be a bool tensor; got {rows.dtype}")
    if accept is None:
        return
    if not isinstance(accept, torch.Tensor):
        raise ConfigurationTypeError(
            f"accept must be a bool scalar tensor; got {type(accept).__name__}"
        )
    if accept.dtype != torch.bool or accept.dim() != 0:
        raise ConfigurationTypeError(
            f"accept must be a bool scalar tensor; got {accept.dtype}{list(accept.shape)}"
        )


def renamed_key(state_dict: Mapping[str, object], key: str, old: str) -> str:
    """``key``, or its old name ``old`` in a dict saved before the rename (not both)."""
    if key in state_dict and old in state_dict:
        raise StateError(f"state_dict holds both {key!r} and its old name {old!r}; keep {key!r}")
    return old if old in state_dict else key


def state_shape(state_dict: Mapping[str, object], owner: str, shape: tuple[int, ...]) -> None:
    """Check that ``state_dict["shape"]`` is a list of ints equal to ``shape``."""
    saved = state_dict.get("shape")
    if not isinstance(saved, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in saved
    ):
        raise StateError(f"state_dict['shape'] must be a list of ints; got {saved!r}")
    if tuple(saved) != shape:
        raise StateError(f"state_dict has shape {tuple(saved)} but this {owner} has shape {shape}")


def state_tensor(
    state_dict: Mapping[str, object],
    key: str,
    shape: tuple[int, ...],
    *,
    nonnegative: str | None = None,
    whole: bool = False,
) -> torch.Tensor:
    """``state_dict[key]``, checked: a real tensor of ``shape`` with finite values.

    Args:
        nonnegative: when given, negative values are impossible; the text says why (e.g.
            ``"a variance"``) in the error.
        whole: the values must be whole numbers (counts).

    Raises:
        StateError: the key is missing, or its value is not a real tensor, has another shape,
            or holds NaN/±inf, negative or fractional values where those are impossible.
    """
    if key not in state_dict:
        raise StateError(f"state_dict lacks {key!r}")
    value = state_dict[key]
    where = f"state_dict[{key!r}]"
    if not isinstance(value, torch.Tensor):
        raise StateError(f"{where} must be a tensor; got {type(value).__name__}")
    if value.is_complex() or value.dtype == torch.bool:
        raise StateError(f"{where} must be a real floating or integer tensor; got {value.dtype}")
    if tuple(value.shape) != shape:
        raise StateError(f"{where} has shape {tuple(value.shape)}; expected {shape}")
    if value.device.type == "meta":  # no values to read
        return value
    data = value.detach()
    # sync-ok: loading a state reads its values once, to refuse impossible ones.
    if data.is_floating_point() and not bool(torch.isfinite(data).all()):
        raise StateError(f"{where} holds NaN or ±inf; a saved state is always finite")
    if nonnegative is not None and bool((data < 0).any()):  # sync-ok: as above
        raise StateError(f"{where} is negative, which is impossible for {nonnegative}")
    if whole and data.is_floating_point() and not bool((data == data.round()).all()):  # sync-ok
        raise StateError(f"{where} must hold whole numbers (it is a count)")
    if whole and data.is_floating_point() and bool((data.abs() >= 2.0**63).any()):  # sync-ok
        raise StateError(f"{where} is beyond the int64 range of a count")
    return value
