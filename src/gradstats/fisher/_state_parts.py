"""Pieces of :mod:`gradstats.fisher._state`: per-family views of the combined group moments, and
the validation of saved statistics (files and state dicts): shapes, finiteness, counts."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gradstats.errors import StateError
from gradstats.moments import RunningMoments

__all__ = ["MOMENT_KEYS", "OLD_NAMES", "FamilyMoments", "check_values", "checked_tensor"]

MOMENT_KEYS = ("count", "weight_sum", "weight_sq_sum", "mean", "m2", "skipped")
# older files and RunningMoments state dicts name the skip counter "rejected"
OLD_NAMES = {"skipped": "rejected"}


class FamilyMoments:
    """Elements lo..hi of a combined :class:`~gradstats.moments.RunningMoments`: one family."""

    def __init__(self, stats: RunningMoments, lo: int, hi: int) -> None:
        self.stats, self.lo, self.hi = stats, lo, hi

    @property
    def mean(self) -> torch.Tensor:
        return self.stats.mean[self.lo : self.hi]

    def standard_error(self) -> torch.Tensor:
        return self.stats.standard_error()[self.lo : self.hi]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The family's own RunningMoments state (the shared counts, its slice of mean / M2)."""
        state = self.stats.state_dict()
        out = {}
        for key in MOMENT_KEYS:
            value = state[key] if key in state else state[OLD_NAMES[key]]
            assert isinstance(value, torch.Tensor)
            out[key] = value[self.lo : self.hi] if key in ("mean", "m2") else value
        return out


def checked_tensor(
    tensors: Mapping[str, object], key: str, shape: tuple[int, ...], where: str
) -> torch.Tensor:
    if key not in tensors:
        raise StateError(f"{where} lacks the entry {key!r}")
    value = tensors[key]
    if not isinstance(value, torch.Tensor):
        raise StateError(f"{where}: {key!r} must be a tensor; got {type(value).__name__}")
    if value.is_complex() or value.dtype == torch.bool:
        raise StateError(f"{where}: {key!r} must be a real tensor; got {value.dtype}")
    if tuple(value.shape) != shape:
        raise StateError(f"{where}: {key!r} has shape {tuple(value.shape)}; expected {shape}")
    return value


def check_values(
    value: torch.Tensor, key: str, where: str, *, nonnegative: bool, whole: bool
) -> None:
    """Impossible values of a saved statistic (one host read each: loading only)."""
    data = value.detach().to(torch.float64)
    if not bool(torch.isfinite(data).all()):  # sync-ok: loading reads the values once
        raise StateError(f"{where}: {key!r} holds NaN or ±inf; a saved statistic is finite")
    if nonnegative and bool((data < 0).any()):  # sync-ok: loading
        raise StateError(
            f"{where}: {key!r} is negative, which is impossible (a count or a sum of squares)"
        )
    if whole and not bool((data == data.round()).all()):  # sync-ok: loading
        raise StateError(f"{where}: {key!r} must hold whole numbers (it is a count)")
