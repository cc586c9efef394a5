"""The AMP loss scale of a step, read through ``GradScaler``'s public API without a host sync.

Under AMP (``torch.amp.GradScaler``) backward hooks see gradients multiplied by the loss scale S,
and ``.grad`` carries S until ``grad_scaler.unscale_(optimizer)`` runs. The scaler divides what
carries S by it on the device. S is read as ``grad_scaler.scale(ones)`` — the documented
``scale()`` multiplies a tensor by S on the device (no host read, unlike ``get_scale()``) and
returns it unchanged when the scaler is disabled — so no private attribute (``_scale``) is read.
Other loss scalers (DeepSpeed, apex, a hand-written one) pass S as ``loss_scale=`` (a device
tensor, or a number).
"""

from __future__ import annotations

import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = ["loss_scale_of"]


def loss_scale_of(
    grad_scaler: torch.amp.GradScaler | None,
    loss_scale: torch.Tensor | float | None,
    device: torch.device,
) -> torch.Tensor | float | None:
    """S of this step (a float64 scalar on ``device``, or ``loss_scale`` as given), or None when
    no loss scaling is in use (no scaler, or a disabled one). No host sync."""
    if grad_scaler is None:
        return loss_scale
    if loss_scale is not None:
        raise ConfigurationError("pass grad_scaler or loss_scale, not both")
    if not callable(getattr(grad_scaler, "scale", None)):
        raise ConfigurationTypeError(
            f"grad_scaler must be a torch.amp.GradScaler; got {type(grad_scaler).__name__}"
        )
    if not grad_scaler.is_enabled():
        return None
    scaled = grad_scaler.scale(torch.ones((), dtype=torch.float64, device=device))
    if not isinstance(scaled, torch.Tensor):  # scale() of one tensor is one tensor
        raise ConfigurationTypeError("grad_scaler.scale(tensor) did not return a tensor")
    return scaled
