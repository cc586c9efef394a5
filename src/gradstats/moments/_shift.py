r"""A shifted mean for low-precision running moments: mean = K + m, kept as two tensors.

Why. A running mean stored in float32 is rounded to ulp(mean) ≈ 6e-8·|mean| at every update, a
random walk of √n such roundings; far from 0 it outgrows the statistical error it is meant to
resolve (measured: 4,096 single-row updates of data 1e5 ± 1 put the float32 mean 0.10 standard
deviations — 6.4 standard errors — off, and its variance 1% off; at 1e4 ± 1, 0.012 sd and
4e-4), while the same data in float64 state is exact to 1e-15.

How. The state keeps a *shift* K (the high part of the mean, ``dtype``) and the mean m of the
shifted data x − K (its low part, ``dtype``); K starts as the first observation (the first row
the mask keeps with a positive weight). A batch is summarised as x − K (exact where x is within
a factor 2 of K, Sterbenz; otherwise the one rounding of the difference) and merged by Chan's
formula in the shifted frame, whose numbers are of the size of the spread, not of the
offset; then (K, m) ← two_sum(K, m) moves the mean's high part into K exactly, so m stays a
rounding residual and K + m carries the mean to about twice ``dtype``'s precision. M2 is
unchanged by a shift (it is a sum of squared deviations). Merges and reductions of summaries
with different shifts convert through float64 (float32 on MPS, which has no float64: there the
conversions, the saved residual and ``all_reduce`` carry float32 precision only). Only
non-float64 states are shifted: float64 ones keep K = 0 and the unshifted arithmetic, bit for
bit.
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
    shift: torch.Tensor,
    weight_sum: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """The shift for a batch ``x``, on ``x``'s device: K itself, or while the state is empty
    (W = 0) the batch's first observation — the first row that the mask keeps and whose weight
    is positive (a row of weight 0 may hold any value), its non-finite entries as 0 — so that
    x − K is of the size of the spread from the first batch on. No host read."""
    kept = None if weight is None else weight.to(x.device) > 0
    if mask is not None:
        kept = mask if kept is None else kept & mask
    index = torch.zeros(1, dtype=torch.int64, device=x.device)
    if kept is not None:  # the first True (0 if none), by a gather: no host read
        index = kept.to(torch.int8).argmax().reshape(1)
    row = x.index_select(0, index)[0].to(shift.dtype)
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
    mine: Moments,
    theirs: Moments,
    their_shift: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(this state's shift, the other summary's mean relative to it in ``dtype``) for a merge;
    either shift may be None (a float64 summary: K = 0). The other's absolute mean
    K_o + m_o is formed in float64; an empty state (W = 0) takes its rounding to ``dtype`` as
    its shift (so a float64 mean keeps its low part), and a summary of no weight is 0 in any
    frame (its mean means nothing; a far one would overflow δ² in float16)."""
    wide = scalar_dtype(theirs.mean.device)
    absolute = theirs.mean.to(wide)
    if their_shift is not None:
        absolute = absolute + their_shift.to(device=absolute.device, dtype=wide)
    if shift is not None:
        shift = torch.where(mine.weight_sum == 0, absolute.to(shift.dtype), shift)
    relative = absolute if shift is None else absolute - shift.to(wide)
    relative = torch.where(theirs.weight_sum > 0, relative, 0.0)
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
