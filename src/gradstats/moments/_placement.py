"""Where a statistic's state lives: a pinned device, or "follow the first data seen"."""

from __future__ import annotations

import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = ["Placement", "canonical_device"]


def canonical_device(device: object) -> torch.device:
    """The device with its index filled in (``"cuda"`` -> ``cuda:0``), as tensors report it.

    Raises:
        ConfigurationTypeError: ``device`` is not a ``torch.device`` or a string.
        ConfigurationError: no such device type, or the device is not usable here.
    """
    if not isinstance(device, (torch.device, str)):
        raise ConfigurationTypeError(
            f"device must be a torch.device or a string; got {type(device).__name__}"
        )
    try:
        resolved = torch.device(device)
        if resolved.type == "cpu":
            return resolved
        return torch.empty(0, device=resolved).device  # fills the index, proves it is usable
    except (RuntimeError, AssertionError) as error:  # unknown type, backend not built/present
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigurationError(f"device {str(device)!r} is not usable here: {reason}") from None


class Placement:
    """The device of a state; unpinned placements move to the first data they see.

    Args:
        device: a device to pin, or ``None`` to follow the data (the state starts on the CPU).
    """

    def __init__(self, device: torch.device | str | None) -> None:
        self.pinned: bool
        self.device: torch.device
        self.pinned = device is not None
        self.device = canonical_device("cpu" if device is None else device)

    def pin(self, device: torch.device | str) -> None:
        """Pin the state to ``device`` from now on."""
        self.device, self.pinned = canonical_device(device), True

    def follow(self, device: torch.device, name: str) -> bool:
        """Accept data on ``device`` (named ``name`` in errors); True if the state must move.

        Raises:
            ConfigurationError: the state is pinned to another device.
        """
        if not self.pinned:
            moved = device != self.device
            self.pin(device)
            return moved
        if device != self.device:
            raise ConfigurationError(
                f"{name} is on {device} but the state lives on {self.device}; move the data "
                f"or the state (.to(device)) so they match"
            )
        return False
