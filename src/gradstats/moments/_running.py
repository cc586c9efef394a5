"""``RunningMoments``: exact streaming mean, variance and standard error of a weighted sample."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gradstats._validation import (
    check_choice,
    normalize_shape,
)
from gradstats._warnings import warn
from gradstats.errors import (
    ConfigurationError,
    ConfigurationTypeError,
    NonFiniteError,
    check_nonfinite,
)
from gradstats.moments._checks import (
    check_state_dtype,
    check_update_arguments,
)
from gradstats.moments._distributed import all_reduce_moments, all_reduce_sum_
from gradstats.moments._placement import Placement
from gradstats.moments._running_state import read_running_state, running_state_dict
from gradstats.moments._shift import (
    all_reduce_shifted,
    centred,
    first_shift,
    into_frame,
    is_shifted,
    recentred,
)
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

    Non-finite observations never poison the state. An ``update`` whose ``x`` holds a NaN or
    ±inf (or whose squared deviations overflow ``dtype``) follows the library's non-finite
    policy (``gradstats.errors``), chosen with ``nonfinite``:

    * ``"skip"`` (default): the batch is dropped as a whole, on the device and without a host
      sync, and counted in ``skipped``;
    * ``"raise"``: :class:`~gradstats.errors.NonFiniteError` is raised before anything changes;
      deciding it reads one boolean back to the host per ``update`` (a documented sync point).

    A batch refused by the caller (``accept=False``) is always skipped and counted, whatever the
    policy. ``rejected`` is the deprecated old name of ``skipped``.

    State lives on the data's device: with ``device=None`` the state moves to the device of the
    first ``update`` (or ``merge``); after that a tensor on another device is an error.

    Args:
        shape: shape of one observation (``()`` for scalars).
        dtype: floating dtype of ``mean`` and M2 (float64 by default). The weight sums are always
            kept in float64 (float32 on MPS). A non-float64 state keeps its mean as a shift K
            plus the mean of x − K (``moments/_shift.py``): no precision is lost to an offset
            far from 0.
        device: where the state lives; ``None`` follows the first data seen.
        weights: ``"frequency"`` or ``"reliability"`` — how weights enter the unbiased variance.
        nonfinite: ``"skip"`` or ``"raise"`` — what a non-finite batch does (see above).

    Raises:
        ConfigurationError: a bad ``shape``, ``weights``, ``nonfinite`` or ``device``
            (:class:`~gradstats.errors.ConfigurationTypeError` for a wrong type).

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
        nonfinite: str = "skip",
    ) -> None:
        self.shape = normalize_shape("shape", shape)
        self.dtype = check_state_dtype(dtype)
        self.weights = check_choice("weights", weights, WEIGHT_KINDS)
        self.nonfinite = check_nonfinite("nonfinite", nonfinite)
        self._placement = Placement(device)
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        device = self._placement.device
        self._state = empty_moments(self.shape, self.dtype, device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        # the shift K of a non-float64 state: ``_state.mean`` is the mean of x − K (_shift.py)
        self._shift: torch.Tensor | None = None
        if is_shifted(self.dtype):
            self._shift = torch.zeros_like(self._state.mean)

    def reset(self) -> RunningMoments:
        """Forget every observation (keeps shape, dtype, weights kind, policy and device)."""
        self._reset_state()
        return self

    @property
    def device(self) -> torch.device:
        return self._placement.device

    def _move_to(self, device: torch.device) -> None:
        self._state = self._state.map(lambda t: t.to(device))
        self._skipped = self._skipped.to(device)
        if self._shift is not None:
            self._shift = self._shift.to(device)

    def to(self, device: torch.device | str) -> RunningMoments:
        """Move the state to ``device`` (this pins the device).

        Raises:
            ConfigurationError: no such device, or it is not usable here (nothing moves).
        """
        self._placement.pin(device)
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
        ``ConfigurationError``; checking them reads their values, a host sync that only happens
        when ``weight`` is given. With ``nonfinite="raise"`` one more boolean is read back.

        Args:
            mask: optional bool [n]: only these rows are observations — the same update as
                ``x[mask]`` (counts included) without the host sync of boolean indexing; the
                other rows are ignored, whatever their values.
            accept: optional bool scalar on the state's device: when false the whole batch is
                skipped (counted in ``skipped``, nothing else changes), as for a non-finite
                batch — for callers that judge a batch by other tensors, without a host read.

        Returns:
            ``self``, so calls chain.

        Raises:
            ConfigurationError: bad shapes, devices or weights
                (:class:`~gradstats.errors.ConfigurationTypeError` for wrong types).
            NonFiniteError: ``nonfinite="raise"`` and the batch is not finite (nothing changed).
        """
        check_update_arguments(x, self.shape, weight, mask, accept)
        if self._placement.pinned and x.device != self.device:
            self._placement.follow(x.device, "x")  # raises: pinned elsewhere
        # sync-ok: the documented weight check (only when weights are given).
        if weight is not None and not bool(torch.isfinite(weight).all() & (weight >= 0).all()):
            raise ConfigurationError("weight must be finite and non-negative")
        if x.shape[0] == 0:
            return self
        shift = self._shift
        if shift is None:
            batch = batch_moments(x, weight, self.dtype, mask)
        else:  # x − K: no precision lost to an offset (moments/_shift.py)
            shift = first_shift(shift, self._state.weight_sum, x, weight, mask)
            batch = batch_moments(centred(x, shift, self.dtype), weight, self.dtype, mask)
        # NaN/inf anywhere in x (or an overflow) makes the batch M2 non-finite: a check over
        # ``shape`` elements instead of the n × shape of x.
        finite = torch.isfinite(batch.m2).all()
        refused = (
            torch.zeros((), dtype=torch.bool, device=finite.device)
            if accept is None
            else ~accept.to(finite.device)
        )
        if self.nonfinite == "raise" and not bool(finite | refused):  # sync-ok: "raise"
            raise NonFiniteError(
                "x holds NaN or ±inf (or its squared deviations overflow "
                f"{str(self.dtype).removeprefix('torch.')}); nothing was added "
                "(nonfinite='raise')"
            )
        if self._placement.follow(x.device, "x"):
            self._move_to(self._placement.device)
        if accept is not None:
            finite = finite & accept.to(finite.device)
        self._state = self._merged(finite, self._state, batch, shift)
        self._skipped += (~finite).to(torch.int64)
        return self

    def _merged(
        self, keep: torch.Tensor | None, mine: Moments, theirs: Moments, frame: torch.Tensor | None
    ) -> Moments:
        """Chan's merge of two summaries whose means are relative to the shift ``frame`` (None
        for a float64 state), taken where ``keep`` (None: always; else ``mine`` and the old
        shift stay); a shifted state then moves its mean's high part into the shift."""
        merged = combine(mine, theirs)
        if frame is not None and self._shift is not None:  # (frame is None iff unshifted)
            shift, mean = recentred(frame, merged.mean)
            merged = merged.with_mean(mean)
            taken = merged.weight_sum > 0  # a summary of no weight keeps its shift
            taken = taken if keep is None else taken & keep
            self._shift = torch.where(taken, shift, self._shift)
        return merged if keep is None else select(keep, merged, mine)

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Fold another summary into this one (Chan's merge); ``other`` is not changed.

        Raises:
            ConfigurationTypeError: ``other`` is not a ``RunningMoments``.
            ConfigurationError: ``other`` has another ``shape`` or ``weights`` kind.
        """
        if not isinstance(other, RunningMoments):
            raise ConfigurationTypeError(
                f"other must be a RunningMoments; got {type(other).__name__}"
            )
        if other.shape != self.shape:
            raise ConfigurationError(
                f"other has shape {other.shape} but this RunningMoments has shape {self.shape}"
            )
        if other.weights != self.weights:
            raise ConfigurationError(
                f"other uses weights={other.weights!r} but this RunningMoments uses "
                f"weights={self.weights!r}; summaries with different weight kinds cannot merge"
            )
        if self._placement.follow(other.device, "other"):
            self._move_to(self._placement.device)
        mine = self._state
        theirs = other._state.map(lambda t: t.to(device=self.device))
        their_mean = theirs.mean.to(self.dtype)
        if self._shift is not None or other._shift is not None:  # into this state's frame
            self._shift, their_mean = into_frame(
                self._shift, mine, theirs, other._shift, self.dtype
            )
        theirs = Moments(
            theirs.count.to(mine.count.dtype),
            theirs.weight_sum.to(mine.weight_sum.dtype),
            theirs.weight_sq_sum.to(mine.weight_sq_sum.dtype),
            their_mean,
            theirs.m2.to(self.dtype),
        )
        self._state = self._merged(None, mine, theirs, self._shift)
        self._skipped = self._skipped + other._skipped.to(self.device)
        return self

    def all_reduce(self, group: object | None = None) -> RunningMoments:
        """Replace this rank's summary by the summary of all ranks' data (in place).

        Two ``torch.distributed.all_reduce`` calls of the packed state: sums of (n, W, W₂, W·mean),
        then of M2_r + W_r (mean_r − mean)², the exact parallel-variance formula. Every rank ends
        with the same values. Afterwards each rank holds the *global* summary, so calling it again
        would count other ranks twice; keep updating a fresh object if you need to reduce again.
        Without an initialised process group this is a no-op.
        """
        if self._shift is None:
            self._state = all_reduce_moments(self._state, group)
        else:  # ranks have their own shifts: reduce the absolute summaries in float64
            self._state, self._shift = all_reduce_shifted(self._state, self._shift, group)
        (self._skipped,) = all_reduce_sum_([self._skipped], group)
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
    def skipped(self) -> torch.Tensor:
        """Number of ``update`` calls skipped (non-finite ``x`` or ``accept=False``), int64."""
        return self._skipped

    @property
    def rejected(self) -> torch.Tensor:
        """Deprecated name of :attr:`skipped` (warns ``FutureWarning``)."""
        warn("RunningMoments.rejected is deprecated; use RunningMoments.skipped", FutureWarning)
        return self._skipped

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
        mean = self._state.mean if self._shift is None else self._shift + self._state.mean
        return torch.where(self._state.weight_sum > 0, mean, float("nan"))

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
        ``weight_sq_sum``, ``mean``, ``m2``, ``skipped``; a non-float64 state adds
        ``mean_residual``: ``mean`` is the mean rounded to ``dtype`` and ``mean_residual`` what
        the rounding left (the shifted state's two parts, see ``moments/_shift.py``).
        """
        return running_state_dict(self._state, self._shift, self.weights, self._skipped)

    def load_state_dict(self, state_dict: Mapping[str, object]) -> None:
        """Restore a ``state_dict``; validates the whole dict before changing anything.

        A dict saved before the counter was renamed (``rejected`` instead of ``skipped``) loads
        too. The values are read once on the host to refuse impossible states.

        Raises:
            StateError: another format or version, a ``shape`` / ``weights`` mismatch, a missing
                key, or an impossible value (wrong shape, NaN/±inf, negative counts or M2,
                fractional counts); the message names the key. Nothing is loaded.
        """
        self._state, self._shift, self._skipped = read_running_state(
            state_dict, self.shape, self.weights, self.dtype, self.device
        )

    def __repr__(self) -> str:
        return (
            f"RunningMoments(shape={self.shape}, dtype={self.dtype}, weights={self.weights!r}, "
            f"count={self.count.item():g}, device={self.device})"  # sync-ok: explicit host read
        )
