r"""A shifted mean for low-precision running moments: mean = K + m, kept as two tensors.

Why. A running mean stored in float32 is rounded to ulp(mean) ≈ 6e-8·|mean| at every update, a
random walk of √n such roundings; far from 0 it outgrows the statistical error it is meant to
resolve (measured: 4,096 single-row updates of data 1e5 ± 1 put the float32 mean 0.10 standard
deviations — 6.4 standard errors — off, and its variance 1% off; at 1e4 ± 1, 0.012 sd and
4e-4), while the same data in float64 state is exact to 1e-15.

How. The state keeps a *shift* K (the high part of the mean, ``dtype``) and the mean m of the
shifted data x − K (its low part, ``dtype``); K starts as the first batch's first row. A batch
is summarised as x − K (exact where x is within a factor 2 of K, Sterbenz; otherwise the one
rounding of the data itself) and merged by
Chan's formula in the shifted frame, whose numbers are of the size of the spread, not of the
offset; then (K, m) ← two_sum(K, m) moves the mean's high part into K exactly, so m stays a
rounding residual and K + m carries the mean to about twice ``dtype``'s precision. M2 is
unchanged by a shift (it is a sum of squared deviations). Merges and reductions of summaries
with different shifts convert through float64. Only non-float64 states are shifted: float64 ones
keep K = 0 and the unshifted arithmetic, bit for bit.
"""

from __future__ import annotations

import torch

from gradstats.moments._distributed import all_reduce_moments
from gradstats.moments._welford import Moments, scalar_dtype

__all__ = [
    "absolute_mean",
    "all_reduce_shifted",
    "centred",
    "first_shift",
    "into_frame",
    "is_shifted",
    "recentred",
    "split_mean",
]


def is_shifted(dtype: torch.dtype) -> bool:
    """Whether a state of ``dtype`` keeps a shift (every floating dtype but float64)."""
    return dtype != torch.float64


def first_shift(
    shift: torch.Tensor, weight_sum: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """The shift for a batch ``x``, on ``x``'s device: K itself, or while the state is empty
    (W = 0) the batch's first kept row (its non-finite entries as 0), so that x − K is of the
    size of the spread from the first batch on. No host read."""
    index = 0 if mask is None else mask.to(torch.int8).argmax()  # the first True (0 if none)
    row = x[index].to(shift.dtype)
    row = torch.where(torch.isfinite(row), row, 0.0)
    empty = (weight_sum == 0).to(x.device)
    return torch.where(empty, row, shift.to(x.device))


def centred(x: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x − K in ``dtype``, subtracted in the wider of the two dtypes (one rounding)."""
    work = torch.promote_types(x.dtype, dtype)
    return (x.to(work) - shift.to(device=x.device, dtype=work)).to(dtype)


def recentred(shift: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K', m') with K' + m' = K + m exactly (Knuth's two_sum): K' = fl(K + m), m' its error."""
    total = shift + mean
    virtual = total - shift
    residual = (shift - (total - virtual)) + (mean - virtual)
    return total, residual


def absolute_mean(mean: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """K + m in float64 (float32 on MPS)."""
    wide = scalar_dtype(mean.device)
    return shift.to(wide) + mean.to(wide)


def split_mean(absolute: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, m) of a float64 absolute mean: K = its rounding to ``dtype``, m = the rest."""
    shift = absolute.to(dtype)
    return shift, (absolute - shift.to(absolute.dtype)).to(dtype)


def into_frame(
    shift: torch.Tensor | None,
    weight_sum: torch.Tensor,
    their_mean: torch.Tensor,
    their_shift: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(this state's shift, the other summary's mean relative to it in ``dtype``) for a merge:
    an empty state (``weight_sum`` = 0) first adopts the other's shift; either shift may be
    None (a float64 summary: 0). The conversion (K_o − K) + m_o is formed in float64."""
    zero = torch.zeros_like(their_mean)
    theirs = zero if their_shift is None else their_shift.to(their_mean.device)
    if shift is not None:
        shift = torch.where(weight_sum == 0, theirs.to(shift.dtype), shift)
    frame = zero if shift is None else shift
    wide = scalar_dtype(their_mean.device)
    relative = (theirs.to(wide) - frame.to(wide)) + their_mean.to(wide)
    return shift, relative.to(dtype)


def all_reduce_shifted(
    state: Moments, shift: torch.Tensor, group: object | None
) -> tuple[Moments, torch.Tensor]:
    """:func:`~gradstats.moments._distributed.all_reduce_moments` of a shifted summary (every
    rank has its own K): the absolute means and M2 reduced in float64, then split again into
    (K, m), the same on every rank."""
    dtype = state.mean.dtype
    wide = state.count.dtype
    absolute = state.with_mean(absolute_mean(state.mean, shift), state.m2.to(wide))
    reduced = all_reduce_moments(absolute, group)
    shift, mean = split_mean(reduced.mean, dtype)
    return reduced.with_mean(mean, reduced.m2.to(dtype)), shift
