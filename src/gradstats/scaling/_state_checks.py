"""Checks of a scaler checkpoint's values: every key present, every tensor possible.

Each check raises a :class:`~gradstats.errors.StateError` that names the key (``counters
['skipped']``, ``tensors['0.weight']['mean']``, ...). They read tensor values on the host (a
sync): they run when a checkpoint is loaded, never on the per-step path.

Possible values, per tensor entry (``shape`` is the entry's declared parameter shape):

=================================  ==========================================================
key                                must be
=================================  ==========================================================
``count``                          a 0-dim integer tensor >= 0
``mean`` (temporal)                a floating tensor of shape ``shape``, finite
``var`` (temporal reference)       a floating tensor of shape ``shape``, finite, >= 0
``var_sum``, ``mean_sq`` (temporal) 0-dim floating tensors, finite, >= 0 (Σ_i v_i, ‖m‖²)
``sq_ema`` (temporal)              a 0-dim floating tensor, finite, >= 0 (an EMA of ‖g‖²)
``noise_ema``, ``signal_ema``      0-dim floating tensors, finite (two-batch estimates are
                                   unbiased and may be negative)
``mu_mean``                        a 0-dim floating tensor, finite
``mu_var``, ``spatial``            0-dim floating tensors, finite, >= 0 (variances)
=================================  ==========================================================

and for the whole checkpoint: ``updates`` an int >= 0; ``counters`` with ``nonfinite``,
``consecutive`` and ``skipped``, 0-dim integer tensors with
0 <= consecutive <= nonfinite <= skipped <= updates; ``factor`` a 1-dim floating tensor with
finite values >= 0 (above 1 for ``rule="adascale"``); ``progress`` (optional) a finite 0-dim
floating tensor >= 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gradstats.errors import StateError

__all__ = [
    "COUNTERS",
    "check_counters",
    "check_entry",
    "check_factor",
    "check_progress",
    "check_updates",
    "need",
]

COUNTERS = ("nonfinite", "consecutive", "skipped")
# key -> (per coordinate: shape of the parameter, else 0-dim; must be >= 0)
_TENSOR_KEYS: dict[str, tuple[bool, bool]] = {
    "mean": (True, False),
    "var": (True, True),
    "var_sum": (False, True),
    "mean_sq": (False, True),
    "sq_ema": (False, True),
    "noise_ema": (False, False),
    "signal_ema": (False, False),
    "mu_mean": (False, False),
    "mu_var": (False, True),
    "spatial": (False, True),
}


def need(mapping: object, key: str, where: str) -> object:
    """``mapping[key]``, or a StateError naming ``where[key]`` when it is missing."""
    if not isinstance(mapping, Mapping):
        raise StateError(f"state_dict{where} must be a dict; got {type(mapping).__name__}")
    if key not in mapping:
        raise StateError(f"state_dict{where} misses the key {key!r}")
    return mapping[key]


def _integer_scalar(value: object, where: str) -> int:
    if (
        not isinstance(value, torch.Tensor)
        or value.dim() != 0
        or value.dtype.is_floating_point
        or value.dtype.is_complex
        or value.dtype == torch.bool
    ):
        found = (
            f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise StateError(f"state_dict{where} must be a 0-dim integer tensor; got {found}")
    number = int(value)  # sync-ok: loading a checkpoint
    if number < 0:
        raise StateError(f"state_dict{where} must be >= 0; got {number}")
    return number


def check_updates(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(f"state_dict['updates'] must be an int; got {type(value).__name__}")
    if value < 0:
        raise StateError(f"state_dict['updates'] must be >= 0; got {value}")
    return value


def check_counters(counters: object, updates: int) -> dict[str, torch.Tensor]:
    """The three counters as int64 tensors, after checking that they can have happened."""
    values = {k: _integer_scalar(need(counters, k, "['counters']"), f"['counters'][{k!r}]")
              for k in COUNTERS}  # fmt: skip
    chain = [values["consecutive"], values["nonfinite"], values["skipped"], updates]
    if chain != sorted(chain):
        raise StateError(
            "state_dict['counters'] is impossible: it needs consecutive <= nonfinite <= skipped "
            f"<= updates; got {values['consecutive']}, {values['nonfinite']}, "
            f"{values['skipped']}, {updates}"
        )
    return {k: torch.tensor(v, dtype=torch.int64) for k, v in values.items()}


def check_factor(factor: object, key: str = "factor") -> torch.Tensor:
    if not isinstance(factor, torch.Tensor) or not factor.is_floating_point() or factor.dim() != 1:
        found = (
            f"shape {tuple(factor.shape)}, dtype {factor.dtype}"
            if isinstance(factor, torch.Tensor)
            else type(factor).__name__
        )
        raise StateError(f"state_dict[{key!r}] must be a 1-dim floating tensor; got {found}")
    valid = bool(((factor >= 0) & torch.isfinite(factor)).all())  # sync-ok: loading
    if not valid:
        raise StateError(f"state_dict[{key!r}] must hold finite factors >= 0 (no NaN)")
    return factor


def check_progress(progress: object, updates: int, skipped: torch.Tensor) -> torch.Tensor:
    """The progress clock τ (float64 0-dim), finite and >= 0. Checkpoints written before it
    existed start it at the number of applied updates (a factor of 1 each)."""
    if progress is None:
        return (updates - skipped).to(torch.float64)
    if not isinstance(progress, torch.Tensor) or not progress.is_floating_point():
        found = progress.dtype if isinstance(progress, torch.Tensor) else type(progress).__name__
        raise StateError(f"state_dict['progress'] must be a floating 0-dim tensor; got {found}")
    if progress.dim() != 0:
        raise StateError(f"state_dict['progress'] must be 0-dim; got shape {tuple(progress.shape)}")
    if not bool(torch.isfinite(progress) & (progress >= 0)):  # sync-ok: loading a checkpoint
        raise StateError("state_dict['progress'] must be finite and >= 0")
    return progress.to(torch.float64)


def _shape(entry: Mapping[str, object], where: str) -> tuple[int, ...]:
    shape = need(entry, "shape", where)
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise StateError(f"state_dict{where}['shape'] must be a list of ints >= 0; got {shape!r}")
    return tuple(shape)


def check_entry(name: str, entry: object) -> tuple[tuple[int, ...], dict[str, torch.Tensor]]:
    """The declared shape and the checked statistic tensors of one ``tensors`` entry."""
    where = f"['tensors'][{name!r}]"
    if not isinstance(entry, Mapping):
        raise StateError(f"state_dict{where} must be a dict; got {type(entry).__name__}")
    shape = _shape(entry, where)
    _integer_scalar(need(entry, "count", where), f"{where}['count']")
    tensors: dict[str, torch.Tensor] = {"count": entry["count"]}
    for key, (full, nonnegative) in _TENSOR_KEYS.items():
        if key not in entry:
            continue
        value = entry[key]
        expected = shape if full else ()
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            found = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise StateError(f"state_dict{where}[{key!r}] must be a floating tensor; got {found}")
        if tuple(value.shape) != expected:
            raise StateError(
                f"state_dict{where}[{key!r}] must have shape {expected} (the entry's shape "
                f"{list(shape)}); got {tuple(value.shape)}"
            )
        if not bool(torch.isfinite(value).all()):  # sync-ok: loading a checkpoint
            raise StateError(f"state_dict{where}[{key!r}] holds NaN or inf")
        if nonnegative and bool((value < 0).any()):  # sync-ok: loading a checkpoint
            raise StateError(
                f"state_dict{where}[{key!r}] is negative; it is a variance or an EMA of "
                "squares, which cannot be"
            )
        tensors[key] = value
    return shape, tensors
