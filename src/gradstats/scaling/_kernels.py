"""Tensor-list kernels of the scaler: norms, sums and the NaN-safe EMA step, without host syncs.

Every function takes lists of gradients (one per parameter tensor that has a gradient this step)
and returns per-tensor results as one device vector, so that the per-tensor bookkeeping of the
statistics is vectorised too.
"""

from __future__ import annotations

import torch

__all__ = ["Scratch", "nan_safe_lerp_", "squared_norms", "state_dtype", "tensor_sums"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """float32, or the parameter's dtype when it is wider (statistics never live in fp16/bf16)."""
    return torch.promote_types(param.dtype, torch.float32)


def squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖t_j‖² of every tensor, as one float64 vector (accumulated in float32 or wider).

    NaN/inf anywhere in t_j makes its entry non-finite; that is how the scaler detects non-finite
    gradients without a separate pass.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    low = any(t.dtype in _LOW_PRECISION for t in tensors)
    norms = (
        torch._foreach_norm(tensors, 2, dtype=torch.float32)
        if low
        else torch._foreach_norm(tensors)
    )
    return torch.stack(norms).to(torch.float64).square()


def tensor_sums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i t_ij of every tensor, as one float64 vector."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([t.sum(dtype=torch.float64) for t in tensors])


class Scratch:
    """One reusable buffer per (device, dtype), as large as the largest tensor seen."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def view(self, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (like.device, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < like.numel():
            buffer = torch.empty(like.numel(), dtype=dtype, device=like.device)
            self._buffers[key] = buffer
        return buffer[: like.numel()].view(like.shape)


def nan_safe_lerp_(
    means: list[torch.Tensor],
    targets: list[torch.Tensor],
    weights: torch.Tensor,
    scratch: Scratch,
    multiplier: torch.Tensor | None = None,
) -> None:
    """m_j ← m_j + w_j (s·t_j − m_j) for every j, in place; w_j = 0 leaves m_j bitwise unchanged.

    A skipped update has w_j = 0, but 0 · NaN is NaN: so each target passes through
    ``nan_to_num`` into a reused scratch buffer first (one read and one write, no allocation),
    and a non-finite target can never reach the state. ``multiplier`` s (a device scalar, e.g.
    1/loss-scale) is applied on the way.
    """
    for mean, target, weight in zip(means, targets, weights.unbind(), strict=True):
        clean = scratch.view(target, mean.dtype)
        if multiplier is not None:
            torch.mul(target, multiplier.to(mean.dtype), out=clean).nan_to_num_(0.0, 0.0, 0.0)
        elif target.dtype == mean.dtype:
            torch.nan_to_num(target, 0.0, 0.0, 0.0, out=clean)
        else:
            clean.copy_(target).nan_to_num_(0.0, 0.0, 0.0)
        mean.lerp_(clean, weight.to(mean.dtype))
