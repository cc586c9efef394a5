"""What every statistic's per-device state shares: its read-out, its persistence, its checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["ScalarTensorState", "StatisticState", "Totals", "reliability_corrected"]


@dataclass(frozen=True)
class Totals:
    """Per-tensor vectors read from a statistic (one entry per tensor, all on one device).

    Attributes:
        noise: the unbiased noise the factor uses; ``signal``: the unbiased signal.
        count: observations per tensor; ``variance``: population noise; ``signal_raw``: the
            uncorrected signal; ``reliability``: ρ_w = Σ_k w_k².
    """

    noise: torch.Tensor
    signal: torch.Tensor
    count: torch.Tensor
    variance: torch.Tensor
    signal_raw: torch.Tensor
    reliability: torch.Tensor

    @staticmethod
    def concatenated(parts: list[Totals], device: torch.device) -> Totals:
        """The per-device totals of several states, concatenated on ``device`` (one state on
        ``device``: its totals as they are, no copy)."""
        if len(parts) == 1 and parts[0].count.device == device:
            return parts[0]

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(p, name).to(device) for p in parts])

        return Totals(
            noise=cat("noise"),
            signal=cat("signal"),
            count=cat("count"),
            variance=cat("variance"),
            signal_raw=cat("signal_raw"),
            reliability=cat("reliability"),
        )


class StatisticState(Protocol):
    """The interface the scaler drives: one object per device block of tensors."""

    beta: float
    min_count: int
    numel: torch.Tensor
    count: torch.Tensor

    def update(
        self,
        grads: list[torch.Tensor | None],
        sq_norms: torch.Tensor,
        take: torch.Tensor,
        *,
        grad_inv: torch.Tensor | None = None,
        hook_inv: torch.Tensor | None = None,
    ) -> None: ...

    def totals(self) -> Totals: ...

    def tensor_state(self, j: int) -> dict[str, torch.Tensor]: ...

    def load_tensor_state(self, j: int, state: dict[str, torch.Tensor]) -> None: ...

    def state_keys(self, foreach: bool) -> tuple[str, ...]: ...


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
