"""``RunningMoments``: exact streaming mean, variance and standard error of a weighted sample."""

from __future__ import annotations

import torch

from gradstats._validation import (
    check_choice,
    check_floating,
    check_state_header,
    normalize_shape,
)
from gradstats.moments._distributed import all_reduce_moments, all_reduce_sum_
from gradstats.moments._placement import Placement
from gradstats.moments._welford import (
    Moments,
    batch_moments,
    combine,
    empty_moments,
    safe_inverse,
    select,
)

__all__ = ["RunningMoments"]

WEIGHT_KINDS = ("frequency", "reliability")
_FORMAT = "gradstats.RunningMoments"
_VERSION = 1


class RunningMoments:
    r"""Streaming elementwise moments of observations ``x_i`` of a fixed ``shape``.

    Exact at every step (West's weighted update, Chan's merge; see ``gradstats.moments``):
    ``update`` any number of times with any batch sizes, ``merge`` summaries in any order or
    ``all_reduce`` them over ``torch.distributed`` ranks, and the result is the one-pass result.

    With weights w_i (``None`` means all ones), W = Σw, W₂ = Σw²:

    * ``mean`` = Σ w_i x_i / W
    * ``variance(unbiased=False)`` = Σ w_i (x_i − mean)² / W   (population)
    * ``variance(unbiased=True)`` = M2 / (W − 1) for ``weights="frequency"`` (w_i are repeat
      counts) and M2 / (W − W₂/W) for ``weights="reliability"`` (w_i are relative precisions);
      both reduce to M2 / (n − 1) without weights.
    * ``effective_sample_size`` = W (frequency) or W² / W₂ (Kish, reliability).
    * ``standard_error()`` = sqrt(variance(unbiased=True) / effective_sample_size), the standard
      error of ``mean``.

    "No estimate" is NaN: ``mean`` before any weight arrives, the unbiased variance and the standard
    error while the effective sample size is at most 1. Nothing is ever divided by zero.

    Non-finite observations never poison the state: an ``update`` whose ``x`` holds a NaN or
    ±inf (or whose squared deviations overflow ``dtype``) is skipped as a whole, on the device
    and without a host sync, and counted in ``rejected``.

    State lives on the data's device: with ``device=None`` the state moves to the device of the
    first ``update`` (or ``merge``); after that a tensor on another device is an error.

    Args:
        shape: shape of one observation (``()`` for scalars).
        dtype: floating dtype of ``mean`` and M2 (float64 by default). The weight sums are always
            kept in float64 (float32 on MPS).
        device: where the state lives; ``None`` follows the first data seen.
        weights: ``"frequency"`` or ``"reliability"`` — how weights enter the unbiased variance.

    Example:
        >>> import torch
        >>> rm = RunningMoments()
        >>> _ = rm.update(torch.tensor([1.0, 2.0])).update(torch.tensor([3.0, 4.0]))
        >>> rm.mean.item(), rm.variance(unbiased=False).item(), rm.variance().item()  # sync-ok
        (2.5, 1.25, 1.6666666666666667)
    """

    def __init__(
        self,
        shape: int | tuple[int, ...] | torch.Size = (),
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        weights: str = "frequency",
    ) -> None:
        self.shape = normalize_shape("shape", shape)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
        self.dtype = dtype
        self.weights = check_choice("weights", weights, WEIGHT_KINDS)
        self._placement = Placement(device)
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        device = self._placement.device
        self._state = empty_moments(self.shape, self.dtype, device)
        self._rejected = torch.zeros((), dtype=torch.int64, device=device)

    def reset(self) -> RunningMoments:
        """Forget every observation (keeps shape, dtype, weights kind and device)."""
        self._reset_state()
        return self

    @property
    def device(self) -> torch.device:
        return self._placement.device

    def _move_to(self, device: torch.device) -> None:
        self._state = Moments(*(t.to(device) for t in self._state))
        self._rejected = self._rejected.to(device)

    def to(self, device: torch.device | str) -> RunningMoments:
        """Move the state to ``device`` (this pins the device)."""
        self._placement.pin(torch.device(device))
        self._move_to(self._placement.device)
        return self

    # ----------------------------------------------------------------- update
    def update(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        accept: torch.Tensor | None = None,
    ) -> RunningMoments:
        """Add the observations ``x`` of shape [n, *shape] (with optional weights of shape [n]).

        An empty batch (n = 0) changes nothing. Negative or non-finite *weights* are a
        ``ValueError``; checking them reads their values, which is the one host sync of this
        method and only happens when ``weight`` is given.

        Args:
            mask: optional bool [n]: only these rows are observations — the same update as
                ``x[mask]`` (counts included) without the host sync of boolean indexing; the
                other rows are ignored, whatever their values.
            accept: optional bool scalar on the state's device: when false the whole batch is
                rejected (counted in ``rejected``, nothing else changes), as for a non-finite
                batch — for callers that judge a batch by other tensors, without a host read.

        Returns:
            ``self``, so calls chain.
        """
        check_floating("x", x)
        if x.dim() != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"x must have shape [n, *shape] = [n, {', '.join(map(str, self.shape))}]; "
                f"got {tuple(x.shape)}"
            )
        if weight is not None:
            check_floating("weight", weight)
        for name, rows in (("weight", weight), ("mask", mask)):
            if rows is None:
                continue
            if tuple(rows.shape) != (x.shape[0],):
                raise ValueError(
                    f"{name} must have shape [n] = [{x.shape[0]}] (one {name} per row of x); "
                    f"got {tuple(rows.shape)}"
                )
            if rows.device != x.device:
                raise ValueError(f"{name} is on {rows.device} but x is on {x.device}")
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor; got {mask.dtype}")
        if weight is not None and not bool(torch.isfinite(weight).all() & (weight >= 0).all()):
            raise ValueError("weight must be finite and non-negative")
        if accept is not None and (accept.dtype != torch.bool or accept.dim() != 0):
            raise TypeError(
                f"accept must be a bool scalar tensor; got {accept.dtype}{list(accept.shape)}"
            )
        if x.shape[0] == 0:
            return self
        if self._placement.follow(x.device, "x"):
            self._move_to(self._placement.device)
        if mask is None:
            batch = batch_moments(x, weight, self.dtype)
        else:
            rows = mask.reshape((-1,) + (1,) * len(self.shape))
            keep = mask.to(x.dtype) if weight is None else torch.where(mask, weight, 0.0)
            batch = batch_moments(torch.where(rows, x, 0.0), keep, self.dtype)
            batch = batch._replace(count=mask.sum().to(batch.count.dtype))
        # NaN/inf anywhere in x (or an overflow) makes the batch M2 non-finite: a check over
        # ``shape`` elements instead of the n × shape of x.
        finite = torch.isfinite(batch.m2).all()
        if accept is not None:
            finite = finite & accept.to(finite.device)
        merged = combine(self._state, batch)
        self._state = select(finite, merged, self._state)
        self._rejected += (~finite).to(torch.int64)
        return self

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Fold another summary into this one (Chan's merge); ``other`` is not changed.

        Raises:
            TypeError: ``other`` is not a ``RunningMoments``.
            ValueError: ``other`` has another ``shape`` or ``weights`` kind.
        """
        if not isinstance(other, RunningMoments):
            raise TypeError(f"other must be a RunningMoments; got {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(
                f"other has shape {other.shape} but this RunningMoments has shape {self.shape}"
            )
        if other.weights != self.weights:
            raise ValueError(
                f"other uses weights={other.weights!r} but this RunningMoments uses "
                f"weights={self.weights!r}; summaries with different weight kinds cannot merge"
            )
        if self._placement.follow(other.device, "other"):
            self._move_to(self._placement.device)
        theirs = Moments(
            *(t.to(device=self.device) for t in other._state[:3]),
            other._state.mean.to(device=self.device, dtype=self.dtype),
            other._state.m2.to(device=self.device, dtype=self.dtype),
        )
        self._state = combine(self._state, theirs)
        self._rejected = self._rejected + other._rejected.to(self.device)
        return self

    def all_reduce(self, group: object | None = None) -> RunningMoments:
        """Replace this rank's summary by the summary of all ranks' data (in place).

        Two ``torch.distributed.all_reduce`` calls of the packed state: sums of (n, W, W₂, W·mean),
        then of M2_r + W_r (mean_r − mean)², the exact parallel-variance formula. Every rank ends
        with the same values. Afterwards each rank holds the *global* summary, so calling it again
        would count other ranks twice; keep updating a fresh object if you need to reduce again.
        Without an initialised process group this is a no-op.
        """
        self._state = all_reduce_moments(self._state, group)
        (self._rejected,) = all_reduce_sum_([self._rejected], group)
        return self

    # ------------------------------------------------------------------ reads
    @property
    def count(self) -> torch.Tensor:
        """Number of observations (rows) added, as a float64 scalar tensor."""
        return self._state.count

    @property
    def weight_sum(self) -> torch.Tensor:
        """W = Σ w (equals ``count`` without weights)."""
        return self._state.weight_sum

    @property
    def rejected(self) -> torch.Tensor:
        """Number of ``update`` calls skipped because ``x`` held a non-finite value."""
        return self._rejected

    @property
    def effective_sample_size(self) -> torch.Tensor:
        """W for frequency weights; Kish's W² / W₂ for reliability weights (0 when empty)."""
        state = self._state
        if self.weights == "frequency":
            return state.weight_sum
        return state.weight_sum.square() * safe_inverse(state.weight_sq_sum)

    @property
    def mean(self) -> torch.Tensor:
        """Σ w x / W; NaN while W = 0."""
        return torch.where(self._state.weight_sum > 0, self._state.mean, float("nan"))

    @property
    def m2(self) -> torch.Tensor:
        """M2 = Σ w (x − mean)², the sum of weighted squared deviations."""
        return self._state.m2

    def variance(self, unbiased: bool = True) -> torch.Tensor:
        """Elementwise variance; see the class docstring for both conventions.

        NaN ("no estimate") when W = 0 (population) or effective sample size <= 1 (unbiased).
        """
        state = self._state
        if unbiased:
            if self.weights == "frequency":
                denom = state.weight_sum - 1.0
            else:
                denom = state.weight_sum * (1.0 - 1.0 / self.effective_sample_size)
            valid = self.effective_sample_size > 1
        else:
            denom, valid = state.weight_sum, state.weight_sum > 0
        denom = torch.where(valid, denom, torch.ones_like(denom)).to(self.dtype)
        return torch.where(valid, state.m2 / denom, float("nan"))

    def standard_error(self) -> torch.Tensor:
        """sqrt(variance(unbiased=True) / effective_sample_size): the standard error of ``mean``."""
        inverse_ess = safe_inverse(self.effective_sample_size).to(self.dtype)
        return (self.variance(unbiased=True) * inverse_ess).sqrt()

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, object]:
        """A plain dict (tensors, str, int, list) loadable with ``torch.load(weights_only=True)``.

        Keys: ``format``, ``version``, ``shape``, ``weights``, ``dtype``, ``count``, ``weight_sum``,
        ``weight_sq_sum``, ``mean``, ``m2``, ``rejected``.
        """
        state = {key: value.detach().clone() for key, value in self._state._asdict().items()}
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "shape": list(self.shape),
            "weights": self.weights,
            "dtype": str(self.dtype).removeprefix("torch."),
            **state,
            "rejected": self._rejected.detach().clone(),
        }

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        """Restore a ``state_dict``; validates everything before changing anything.

        Raises:
            ValueError: another format or version, or a ``shape`` / ``weights`` mismatch.
        """
        check_state_header(state_dict, _FORMAT, _VERSION)
        if tuple(state_dict["shape"]) != self.shape:
            raise ValueError(
                f"state_dict has shape {tuple(state_dict['shape'])} but this RunningMoments "
                f"has shape {self.shape}"
            )
        if state_dict["weights"] != self.weights:
            raise ValueError(
                f"state_dict uses weights={state_dict['weights']!r} but this RunningMoments uses "
                f"weights={self.weights!r}"
            )
        device = self.device
        fields = {}
        for name in Moments._fields:
            value = state_dict[name]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"state_dict[{name!r}] must be a tensor")
            dtype = self.dtype if name in ("mean", "m2") else self._state.count.dtype
            fields[name] = value.to(device=device, dtype=dtype)
        for name in ("mean", "m2"):
            if tuple(fields[name].shape) != self.shape:
                raise ValueError(f"state_dict[{name!r}] has shape {tuple(fields[name].shape)}")
        self._state = Moments(**fields)
        self._rejected = state_dict["rejected"].to(device=device, dtype=torch.int64)

    def __repr__(self) -> str:
        return (
            f"RunningMoments(shape={self.shape}, dtype={self.dtype}, weights={self.weights!r}, "
            f"count={self.count.item():g}, device={self.device})"  # sync-ok: explicit host read
        )
