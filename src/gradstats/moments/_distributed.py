"""Reductions of streaming statistics over ``torch.distributed`` ranks.

Every function here is a no-op without an initialised default process group, so the same code
runs in one process and under ``torchrun``. All ranks receive bitwise-identical results.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from gradstats.moments._welford import Moments, safe_inverse

__all__ = ["all_reduce_moments", "all_reduce_sum_", "distributed_ready"]


def distributed_ready() -> bool:
    """True when ``torch.distributed`` is available and its default group is initialised."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum_(
    tensors: Sequence[torch.Tensor], group: object | None = None
) -> list[torch.Tensor]:
    """Sum each tensor over ranks, one collective per dtype (tensors are packed flat).

    Returns new tensors with the input shapes and dtypes; the inputs are not modified.
    """
    tensors = list(tensors)
    if not distributed_ready():
        return tensors
    out: list[torch.Tensor] = list(tensors)  # every slot is replaced below
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(index)
    for indices in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for i, piece in zip(
            indices, flat.split([tensors[i].numel() for i in indices]), strict=True
        ):
            out[i] = piece.view(tensors[i].shape)
    return out


def all_reduce_moments(state: Moments, group: object | None = None) -> Moments:
    """The summary of all ranks' observations, on every rank (exact parallel formula).

    With per-rank (W_r, mean_r, M2_r): W = Σ W_r, mean = Σ W_r mean_r / W,
    M2 = Σ_r [M2_r + W_r (mean_r − mean)²]. Two collectives.
    """
    if not distributed_ready():
        return state
    dtype = state.mean.dtype
    weighted_mean = state.mean * state.weight_sum.to(dtype)
    count, weight_sum, weight_sq_sum, weighted_mean = all_reduce_sum_(
        [state.count, state.weight_sum, state.weight_sq_sum, weighted_mean], group
    )
    mean = weighted_mean * safe_inverse(weight_sum).to(dtype)
    spread = state.m2 + state.weight_sum.to(dtype) * (state.mean - mean).square()
    (m2,) = all_reduce_sum_([spread], group)
    return Moments(count, weight_sum, weight_sq_sum, mean, m2)
