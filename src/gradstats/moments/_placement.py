"""Where a statistic's state lives: a pinned device, or "follow the first data seen"."""

from __future__ import annotations

import torch

__all__ = ["Placement", "canonical_device"]


def canonical_device(device: torch.device | str) -> torch.device:
    """The device with its index filled in (``"cuda"`` -> ``cuda:0``), as tensors report it."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        return torch.empty(0, device=device).device
    return device


class Placement:
    """The device of a state; unpinned placements move to the first data they see.

    Args:
        device: a device to pin, or ``None`` to follow the data (the state starts on the CPU).
    """

    def __init__(self, device: torch.device | str | None) -> None:
        self.pinned = device is not None
        self.device = canonical_device("cpu" if device is None else device)

    def pin(self, device: torch.device | str) -> None:
        """Pin the state to ``device`` from now on."""
        self.device, self.pinned = canonical_device(device), True

    def follow(self, device: torch.device, name: str) -> bool:
        """Accept data on ``device`` (named ``name`` in errors); True if the state must move.

        Raises:
            ValueError: the state is pinned to another device.
        """
        if not self.pinned:
            moved = device != self.device
            self.pin(device)
            return moved
        if device != self.device:
            raise ValueError(
                f"{name} is on {device} but the state lives on {self.device}; move the data "
                f"or the state (.to(device)) so they match"
            )
        return False
