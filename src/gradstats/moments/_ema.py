r"""Exponential moving moments, debiased and reliability-corrected.

After t updates x_1..x_t the EMA weights are

    w_k = (1 − β) β^(t−k) / (1 − β^t),   Σ_k w_k = 1,

i.e. a zero-initialised EMA divided by 1 − β^t. Per element:

    mean m_t = Σ w_k x_k,   population variance v_t = Σ w_k (x_k − m_t)².

Both are updated in deviation form (West 1979), which is the zero-initialised, debiased EMA
written without E[x²] − E[x]² cancellation. With step a_t = (1 − β)/(1 − β^t) (a_1 = 1):

    d = x_t − m_{t−1},   m_t = m_{t−1} + a_t d,   v_t = (1 − a_t)(v_{t−1} + a_t d²).

The state stores the moments of x − K, with K the first observation (the shifted-data
algorithm): m_t = K + EMA(x − K). This is exact at t = 1, keeps a constant stream exactly
constant, and keeps mean increments a_t·d representable in float32 even when |x| ≫ its spread
(a float32 EMA of 10⁴ + 10⁻² noise would otherwise lose every increment below ulp(10⁴) ≈ 10⁻³).

Reliability (Bessel-like) correction: E[v_t] = σ²(1 − ρ_w) for i.i.d. x with variance σ², where

    ρ_w = Σ w_k² = (1 − β)(1 + β^t) / ((1 + β)(1 − β^t)),

so s_t = v_t / (1 − ρ_w) is unbiased and 1/ρ_w is the effective sample size. At t = 1, ρ_w = 1:
the unbiased variance has no estimate (NaN), it is never divided by zero.

Golden values (β = 0.99, x = 1, 2, 3, 4): mean 2.512562560288946, population variance
1.2498926845788585, unbiased 1.6665937190836144, ρ_w 0.2500315642218311.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from gradstats._validation import (
    check_floating,
    check_open_unit,
    check_shape,
    check_state_header,
    normalize_shape,
)
from gradstats.errors import ConfigurationTypeError, NonFiniteError, StateError, check_nonfinite
from gradstats.moments._checks import check_state_dtype, state_shape, state_tensor
from gradstats.moments._placement import Placement
from gradstats.moments._welford import scalar_dtype

__all__ = ["EMAMoments", "ema_reliability", "ema_step_size", "ema_step_sizes", "ema_update"]

_FORMAT = "gradstats.EMAMoments"
_VERSION = 1


def _power(beta: float, count: torch.Tensor) -> torch.Tensor:
    """β^t in float64 (float32 on MPS), for a count tensor t >= 1 of any dtype."""
    return torch.pow(beta, count.to(scalar_dtype(count.device)).clamp(min=1))


def ema_step_size(beta: float, count: torch.Tensor) -> torch.Tensor:
    """a_t = (1 − β) / (1 − β^t) for counts t >= 1, in float64; a_1 = 1 exactly."""
    step = (1.0 - beta) / (1.0 - _power(beta, count))
    return torch.where(count <= 1, 1.0, step)


def ema_step_sizes(beta: float, count: torch.Tensor) -> list[float]:
    """:func:`ema_step_size` as Python floats, with its bits: β^t is torch's own pow on the same
    tensor (its last bit depends on an element's position in the vector), the rest is the same
    correctly rounded float64 arithmetic, done on the host (a number divided by a tensor is
    its reciprocal times the number in torch, so here too). For state that lives on the CPU,
    where reading a tensor waits for nothing."""
    numerator = 1.0 - beta
    steps = []
    counts, powers = count.tolist(), _power(beta, count).tolist()  # sync-ok: CPU state only
    for t, power in zip(counts, powers, strict=True):
        below = 1.0 - power
        steps.append(1.0 if t <= 1 else (1.0 / below if below else math.inf) * numerator)
    return steps


def ema_reliability(beta: float, count: torch.Tensor) -> torch.Tensor:
    """ρ_w = Σ w_k² = (1 − β)(1 + β^t) / ((1 + β)(1 − β^t)) for t >= 1, in float64; ρ_1 = 1."""
    power = _power(beta, count)
    rho = ((1.0 - beta) * (1.0 + power)) / ((1.0 + beta) * (1.0 - power))
    return torch.where(count <= 1, 1.0, rho)


def ema_update(
    mean: torch.Tensor, variance: torch.Tensor, x: torch.Tensor, step: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One deviation-form update; returns the new (mean, population variance).

    ``step`` is a_t from :func:`ema_step_size`; it is cast to the dtype of ``mean``.
    """
    step = step.to(mean.dtype)
    delta = x - mean
    new_mean = mean + step * delta
    new_variance = (1.0 - step) * (variance + step * delta.square())
    return new_mean, new_variance


class EMAMoments:
    r"""Elementwise exponential moving mean and variance, debiased, with reliability correction.

    See the module docstring for the exact weights and update. Reads:

    * ``mean`` — m_t (NaN before the first update)
    * ``variance`` — population v_t = Σ w_k (x_k − m_t)² (0 at t = 1, NaN at t = 0)
    * ``unbiased_variance`` — v_t / (1 − ρ_w) (NaN, "no estimate", while t <= 1)
    * ``reliability`` — ρ_w;  ``effective_sample_size`` — 1/ρ_w (0 at t = 0)
    * ``standard_error()`` — sqrt(unbiased_variance · ρ_w), the standard error of ``mean``

    The count t belongs to this buffer: a skipped update changes nothing and does not advance t,
    on the device and without a host sync; ``skipped`` counts them. An update is skipped when
    ``skip=True`` (an AMP overflow, say) or, under the default ``nonfinite="skip"``, when Σx² is
    not finite in the state dtype (x holds a NaN or ±inf, or squares too large to represent).
    With ``nonfinite="raise"`` such an ``x`` (unless ``skip`` is true) raises
    :class:`~gradstats.errors.NonFiniteError` before anything changes; deciding it reads one
    boolean back to the host per ``update`` (a documented sync point).

    Args:
        beta: decay in (0, 1).
        shape: shape of one observation.
        dtype: floating dtype of the state (float64 by default; float32 halves the memory and
            stays accurate thanks to the shift; float16/bfloat16 observations are upcast).
        device: where the state lives; ``None`` follows the first update's data.
        nonfinite: ``"skip"`` (default) or ``"raise"``: what a non-finite ``x`` does (see above).

    Raises:
        ConfigurationError: a bad ``beta``, ``shape``, ``nonfinite`` or ``device``
            (:class:`~gradstats.errors.ConfigurationTypeError` for a wrong type).

    Example:
        >>> import torch
        >>> ema = EMAMoments(beta=0.99, dtype=torch.float64)
        >>> for value in (1.0, 2.0, 3.0, 4.0):
        ...     _ = ema.update(torch.tensor(value))
        >>> round(ema.mean.item(), 12), round(ema.unbiased_variance.item(), 12)  # sync-ok
        (2.512562560289, 1.666593719084)
    """

    def __init__(
        self,
        beta: float = 0.99,
        shape: int | tuple[int, ...] | torch.Size = (),
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        nonfinite: str = "skip",
    ) -> None:
        self.beta = check_open_unit("beta", beta)
        self.shape = normalize_shape("shape", shape)
        self.dtype = check_state_dtype(dtype)
        self.nonfinite = check_nonfinite("nonfinite", nonfinite)
        self._placement = Placement(device)
        self._reset_state()

    def _reset_state(self) -> None:
        device = self._placement.device
        self._shift = torch.zeros(self.shape, dtype=self.dtype, device=device)
        self._mean = torch.zeros(self.shape, dtype=self.dtype, device=device)
        self._variance = torch.zeros(self.shape, dtype=self.dtype, device=device)
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)

    def reset(self) -> EMAMoments:
        """Forget every observation (keeps beta, shape, dtype, policy and device)."""
        self._reset_state()
        return self

    @property
    def device(self) -> torch.device:
        return self._placement.device

    def _move_to(self, device: torch.device) -> None:
        for name in ("_shift", "_mean", "_variance", "_count", "_skipped"):
            setattr(self, name, getattr(self, name).to(device))

    def to(self, device: torch.device | str) -> EMAMoments:
        """Move the state to ``device`` (this pins the device).

        Raises:
            ConfigurationError: no such device, or it is not usable here (nothing moves).
        """
        self._placement.pin(device)
        self._move_to(self._placement.device)
        return self

    def update(self, x: torch.Tensor, *, skip: torch.Tensor | bool | None = None) -> EMAMoments:
        """Add one observation ``x`` of shape ``shape``.

        Args:
            x: the observation (any floating dtype; upcast to the state dtype).
            skip: optional bool (or bool tensor on the state's device, e.g. a ``GradScaler``'s
                found-inf flag) that turns this update into a no-op.

        Returns:
            ``self``, so calls chain.

        Raises:
            ConfigurationError: ``x`` has another shape, or lives on another (pinned) device
                (:class:`~gradstats.errors.ConfigurationTypeError` for wrong types).
            NonFiniteError: ``nonfinite="raise"``, ``x`` is not finite and ``skip`` is not true
                (nothing changed).
        """
        check_floating("x", x)
        check_shape("x", x, self.shape, "shape")
        flag: torch.Tensor | None = None
        if skip is not None:
            if not isinstance(skip, (bool, torch.Tensor)):
                raise ConfigurationTypeError(
                    f"skip must be a bool or a 0-dim bool tensor; got {type(skip).__name__}"
                )
            flag = torch.as_tensor(skip)
            if flag.dtype != torch.bool or flag.dim() != 0:
                raise ConfigurationTypeError(
                    f"skip must be a bool or a 0-dim bool tensor; got {flag!r}"
                )
        if self._placement.pinned and x.device != self.device:
            self._placement.follow(x.device, "x")  # raises: pinned elsewhere
        x = x.to(self.dtype)
        flat = x.reshape(-1)
        apply = torch.isfinite(torch.dot(flat, flat))  # no NaN/inf, squares representable
        if flag is not None:
            apply = apply & ~flag.to(x.device)
        if self.nonfinite == "raise":
            bad = ~apply if flag is None else ~apply & ~flag.to(x.device)
            if bool(bad):  # sync-ok: nonfinite="raise" reads one boolean
                raise NonFiniteError(
                    "x holds NaN or ±inf (or its squares overflow "
                    f"{str(self.dtype).removeprefix('torch.')}); nothing was changed "
                    "(nonfinite='raise')"
                )
        if self._placement.follow(x.device, "x"):
            self._move_to(self._placement.device)
        count = self._count + apply.to(torch.int64)
        step = torch.where(apply, ema_step_size(self.beta, count), 0.0).to(self.dtype)
        first = ((self._count == 0) & apply).to(self.dtype)
        gain = step * (1.0 - first)
        # In place. The first update sets K := x (exact: K and the mean are 0 before) and leaves
        # the shifted mean and variance at 0. A skipped update has step = gain = 0 and a
        # sanitised delta, so K, mean and variance stay bitwise unchanged.
        delta = torch.sub(x, self._shift).sub_(self._mean).nan_to_num_(0.0, 0.0, 0.0)
        self._shift.addcmul_(delta, first)
        self._mean.addcmul_(delta, gain)
        self._variance.add_(delta.square_().mul_(gain)).mul_(1.0 - step)
        self._count = count
        self._skipped = self._skipped + (~apply).to(torch.int64)
        return self

    # ------------------------------------------------------------------ reads
    @property
    def count(self) -> torch.Tensor:
        """t: number of updates this buffer received (skipped ones excluded), int64 scalar."""
        return self._count

    @property
    def skipped(self) -> torch.Tensor:
        """Number of updates skipped (``skip=True`` or a non-finite ``x``)."""
        return self._skipped

    @property
    def mean(self) -> torch.Tensor:
        """Debiased EMA mean m_t = K + EMA(x − K); NaN before the first update."""
        return torch.where(self._count > 0, self._shift + self._mean, float("nan"))

    @property
    def variance(self) -> torch.Tensor:
        """Population variance v_t under the EMA weights; NaN before the first update."""
        return torch.where(self._count > 0, self._variance, float("nan"))

    @property
    def reliability(self) -> torch.Tensor:
        """ρ_w = Σ w_k²; NaN before the first update."""
        rho = ema_reliability(self.beta, self._count).to(self.dtype)
        return torch.where(self._count > 0, rho, float("nan"))

    @property
    def effective_sample_size(self) -> torch.Tensor:
        """1/ρ_w (1 at t = 1, → (1 + β)/(1 − β) as t grows; 0 before the first update)."""
        rho = ema_reliability(self.beta, self._count).to(self.dtype)
        return torch.where(self._count > 0, 1.0 / rho, 0.0)

    @property
    def unbiased_variance(self) -> torch.Tensor:
        """s_t = v_t / (1 − ρ_w); NaN ("no estimate") while t <= 1."""
        rho = ema_reliability(self.beta, self._count.clamp(min=2)).to(self.dtype)
        return torch.where(self._count > 1, self._variance / (1.0 - rho), float("nan"))

    def standard_error(self) -> torch.Tensor:
        """sqrt(s_t · ρ_w): the standard error of ``mean`` (NaN while t <= 1)."""
        return (self.unbiased_variance * self.reliability).sqrt()

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, object]:
        """Keys: ``format``, ``version``, ``beta``, ``shape``, ``dtype``, ``shift`` (K),
        ``mean`` (debiased EMA of x − K), ``variance`` (population), ``count``, ``skipped``."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "beta": self.beta,
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "shift": self._shift.detach().clone(),
            "mean": self._mean.detach().clone(),
            "variance": self._variance.detach().clone(),
            "count": self._count.detach().clone(),
            "skipped": self._skipped.detach().clone(),
        }

    def load_state_dict(self, state_dict: Mapping[str, object]) -> None:
        """Restore a ``state_dict``; validates the whole dict before changing anything.

        The values are read once on the host to refuse impossible states.

        Raises:
            StateError: another format or version, a ``beta`` / ``shape`` mismatch, a missing
                key, or an impossible value (wrong shape, NaN/±inf, a negative variance, a
                negative or fractional count); the message names the key. Nothing is loaded.
        """
        check_state_header(state_dict, _FORMAT, _VERSION)
        if state_dict.get("beta") != self.beta:
            raise StateError(
                f"state_dict has beta={state_dict.get('beta')!r} but this EMAMoments has "
                f"beta={self.beta!r}; construct it with the checkpoint's beta"
            )
        state_shape(state_dict, "EMAMoments", self.shape)
        shift = state_tensor(state_dict, "shift", self.shape)
        mean = state_tensor(state_dict, "mean", self.shape)
        variance = state_tensor(state_dict, "variance", self.shape, nonnegative="a variance")
        count = state_tensor(state_dict, "count", (), nonnegative="a count", whole=True)
        skipped = state_tensor(state_dict, "skipped", (), nonnegative="a count", whole=True)
        device = self.device
        self._shift = shift.to(device=device, dtype=self.dtype, copy=True)
        self._mean = mean.to(device=device, dtype=self.dtype, copy=True)
        self._variance = variance.to(device=device, dtype=self.dtype, copy=True)
        self._count = count.to(device=device, dtype=torch.int64, copy=True)
        self._skipped = skipped.to(device=device, dtype=torch.int64, copy=True)

    def __repr__(self) -> str:
        return (
            f"EMAMoments(beta={self.beta}, shape={self.shape}, dtype={self.dtype}, "
            f"count={self._count.item()}, device={self.device})"  # sync-ok: explicit host read
        )
