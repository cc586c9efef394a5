"""What every statistic's per-device state shares: its read-out and its persistence."""

from __future__ import annotations

import torch

__all__ = ["ScalarTensorState", "Totals", "reliability_corrected"]


class Totals(dict):
    """Per-tensor vectors read from a statistic: ``noise``, ``signal``, ``count``, ``variance``
    (population), ``signal_raw`` (uncorrected) and ``reliability`` (ρ_w)."""


def reliability_corrected(
    population: torch.Tensor, rho: torch.Tensor, count: torch.Tensor, min_count: int
) -> torch.Tensor:
    """population / (1 − ρ_w) where ``count >= min_count``, else 0 (never a division by zero)."""
    valid = count >= min_count
    return torch.where(valid, population / torch.where(valid, 1.0 - rho, 1.0), 0.0)


class ScalarTensorState:
    """Persistence of states made of one device vector per key (one entry per tensor)."""

    _KEYS: tuple[str, ...] = ()

    def tensor_state(self, j: int) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key)[j].clone() for key in self._KEYS}

    def load_tensor_state(self, j: int, state: dict[str, torch.Tensor]) -> None:
        for key in self._KEYS:
            getattr(self, key)[j] = state[key]

    @classmethod
    def state_keys(cls, foreach: bool) -> tuple[str, ...]:
        return cls._KEYS
