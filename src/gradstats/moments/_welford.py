"""Exact streaming moments: West's weighted update and Chan's parallel merge.

A set of observations x_1..x_n (each a tensor of ``shape``) with non-negative weights w_i is
summarised by the sufficient statistics

    n,  W = Σ w_i,  W₂ = Σ w_i²,  mean = Σ w_i x_i / W,  M2 = Σ w_i (x_i − mean)².

Two summaries A and B combine exactly (Chan, Golub & LeVeque 1979), with δ = mean_B − mean_A:

    W = W_A + W_B,  mean = mean_A + δ · W_B / W,  M2 = M2_A + M2_B + δ² · W_A · W_B / W.

The merge is associative and commutative up to rounding, so any split of the data into update
calls, shards, files or ranks gives the one-pass result. A batch is summarised by a two-pass
(deviation) computation before it is merged, so no E[x²] − E[x]² cancellation happens anywhere.

The weight scalars (n, W, W₂) are kept in float64 whatever ``dtype`` the mean and M2 use, so a
float32 stream of 10⁸ observations still counts exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace

import torch

__all__ = [
    "Moments",
    "batch_moments",
    "combine",
    "empty_moments",
    "safe_inverse",
    "scalar_dtype",
    "select",
]


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of a weighted sample (all tensors on one device)."""

    count: torch.Tensor  # number of observations (rows), float64 scalar
    weight_sum: torch.Tensor  # W = Σ w, float64 scalar
    weight_sq_sum: torch.Tensor  # W₂ = Σ w², float64 scalar
    mean: torch.Tensor  # Σ w x / W, shape ``shape``; 0 while W = 0
    m2: torch.Tensor  # Σ w (x − mean)², shape ``shape``

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Field name -> tensor (the tensors themselves, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Moments:
        """The summary with ``fn`` applied to every tensor (e.g. a device move)."""
        return Moments(*(fn(t) for t in self))

    def with_count(self, count: torch.Tensor) -> Moments:
        """The same summary with another ``count``."""
        return replace(self, count=count)

    def with_mean(self, mean: torch.Tensor, m2: torch.Tensor | None = None) -> Moments:
        """The same summary with another ``mean`` (and ``m2``, if given)."""
        return replace(self, mean=mean, m2=self.m2 if m2 is None else m2)


def scalar_dtype(device: torch.device) -> torch.dtype:
    """float64 for the weight scalars, except on backends without float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def empty_moments(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None
) -> Moments:
    """The summary of no observations."""
    device = torch.device("cpu") if device is None else torch.device(device)
    sdt = scalar_dtype(device)
    zero = torch.zeros((), dtype=sdt, device=device)
    return Moments(
        count=zero.clone(),
        weight_sum=zero.clone(),
        weight_sq_sum=zero.clone(),
        mean=torch.zeros(shape, dtype=dtype, device=device),
        m2=torch.zeros(shape, dtype=dtype, device=device),
    )


def safe_inverse(w: torch.Tensor) -> torch.Tensor:
    """1 / w where w > 0, else 0 (no host sync, no NaN)."""
    positive = w > 0
    return torch.where(positive, 1.0 / torch.where(positive, w, torch.ones_like(w)), 0.0)


def batch_moments(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    dtype: torch.dtype,
    mask: torch.Tensor | None = None,
) -> Moments:
    """Summarise the rows of ``x`` ([n, *shape]) by a two-pass computation in ``dtype``.

    ``weight`` is ``None`` (all ones) or a tensor of shape [n]; ``mask`` (bool [n]) keeps only
    some rows — the summary of ``x[mask]`` without the host sync of boolean indexing.
    """
    if mask is not None:
        rows = mask.reshape((-1,) + (1,) * (x.dim() - 1))
        keep = mask.to(x.dtype) if weight is None else torch.where(mask, weight, 0.0)
        batch = batch_moments(torch.where(rows, x, 0.0), keep, dtype)
        return batch.with_count(mask.sum().to(batch.count.dtype))
    x = x.to(dtype)
    sdt = scalar_dtype(x.device)
    n = x.shape[0]
    count = torch.full((), float(n), dtype=sdt, device=x.device)
    if weight is None:
        mean = x.mean(dim=0)
        m2 = (x - mean).square_().sum(dim=0)
        return Moments(count, count.clone(), count.clone(), mean, m2)
    w = weight.to(device=x.device, dtype=sdt)
    weight_sum = w.sum()
    w_x = w.to(dtype).reshape((n,) + (1,) * (x.dim() - 1))
    mean = (w_x * x).sum(dim=0) * safe_inverse(weight_sum).to(dtype)
    m2 = (w_x * (x - mean).square_()).sum(dim=0)
    return Moments(count, weight_sum, w.square().sum(), mean, m2)


def combine(a: Moments, b: Moments) -> Moments:
    """Chan's merge of two summaries; exact and order-free up to rounding."""
    weight_sum = a.weight_sum + b.weight_sum
    frac_b = b.weight_sum * safe_inverse(weight_sum)  # W_B / W  (0 when W = 0)
    delta = b.mean - a.mean
    dtype = a.mean.dtype
    mean = a.mean + delta * frac_b.to(dtype)
    m2 = a.m2 + b.m2 + delta.square() * (a.weight_sum * frac_b).to(dtype)
    return Moments(
        count=a.count + b.count,
        weight_sum=weight_sum,
        weight_sq_sum=a.weight_sq_sum + b.weight_sq_sum,
        mean=mean,
        m2=m2,
    )


def select(keep_new: torch.Tensor, new: Moments, old: Moments) -> Moments:
    """Elementwise ``new if keep_new else old`` for every field (on device, no sync)."""
    return Moments(*(torch.where(keep_new, n, o) for n, o in zip(new, old, strict=True)))
