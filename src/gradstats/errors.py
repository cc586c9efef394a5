"""The one error family of gradstats and its one non-finite policy.

Every error gradstats raises on purpose is a :class:`GradstatsError`. Each subclass also derives
from the builtin exception that fits the case, so code written against the builtins keeps
working (``except ValueError`` still catches a bad argument):

- ``ConfigurationError`` (a ``ValueError``): an argument, option or config value is invalid;
  ``ConfigurationTypeError`` (also a ``TypeError``) when it has the wrong type.
- ``StateError`` (a ``ValueError``): a state dict, checkpoint or result file is incompatible,
  incomplete or impossible (negative counts or variances, NaN sums, wrong shapes).
- ``DivergenceError`` (a ``RuntimeError``): a solver or a training run diverged.
- ``NonFiniteError`` (a ``FloatingPointError``): non-finite data met ``nonfinite="raise"``, or a run
  of consecutive non-finite steps reached its limit.

**Non-finite policy.** Every object that consumes data which may hold NaN/±inf takes the same
option, ``nonfinite``, with the same two values (:data:`NONFINITE_POLICIES`):

* ``"skip"`` — the offending contribution (a batch, a step, a gradient estimate) is dropped as a
  whole, on the data's device and without a host sync; the state is left exactly as it was and
  the drop is counted in a counter named ``skipped`` on every object.
* ``"raise"`` — a :class:`NonFiniteError` is raised *before* anything is changed. Deciding this
  needs the data's finiteness on the host, so ``"raise"`` costs one host read per call (a
  documented sync point).

Each pillar documents its default. The counters are int64 tensors on the data's device (read them
with ``int(obj.skipped)`` when you need a number).

>>> issubclass(ConfigurationError, ValueError) and issubclass(StateError, GradstatsError)
True
>>> check_nonfinite("nonfinite", "skip")
'skip'
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "NONFINITE_POLICIES",
    "ConfigurationError",
    "ConfigurationTypeError",
    "DivergenceError",
    "GradstatsError",
    "NonFiniteError",
    "NonFinitePolicy",
    "StateError",
    "check_nonfinite",
]

NonFinitePolicy = Literal["skip", "raise"]
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "raise")


class GradstatsError(Exception):
    """Base class of every error gradstats raises on purpose."""


class ConfigurationError(GradstatsError, ValueError):
    """An argument, option or configuration value is invalid; the message names it and the valid
    values."""


class ConfigurationTypeError(ConfigurationError, TypeError):
    """An argument has the wrong type (also a ``TypeError``)."""


class StateError(GradstatsError, ValueError):
    """A state dict, checkpoint or result file is incompatible with this object or version,
    misses keys, or holds impossible values (negative counts or variances, NaN sums, wrong
    shapes). Nothing is loaded when it is raised."""


class DivergenceError(GradstatsError, RuntimeError):
    """A relaxation, an adjoint solve or a training run diverged (a residual grew past its bound,
    or became NaN/inf).

    Attributes:
        phase: the phase that diverged (``"free"``, ``"adjoint"``, ``"nudged"``, ``"bptt"``,
            ``"train"``), or ``None`` when not known.
        step: the step at which divergence was detected, or ``None``.
        samples: indices of the offending samples (may be empty).
    """

    def __init__(
        self,
        message: str,
        *,
        phase: str | None = None,
        step: int | None = None,
        samples: list[int] | None = None,
    ) -> None:
        super().__init__(message)
        self.phase = phase
        self.step = step
        self.samples = [] if samples is None else samples


class NonFiniteError(GradstatsError, FloatingPointError):
    """Non-finite data met ``nonfinite="raise"``, or a run of consecutive non-finite steps reached
    its limit (e.g. the scaler's ``max_nonfinite_steps``)."""


def check_nonfinite(name: str, value: object) -> str:
    """Return ``value`` if it is a valid non-finite policy; otherwise raise a ConfigurationError.

    >>> check_nonfinite("nonfinite", "ignore")
    Traceback (most recent call last):
    ...
    gradstats.errors.ConfigurationError: nonfinite must be one of 'skip', 'raise'; got 'ignore'
    """
    if not isinstance(value, str) or value not in NONFINITE_POLICIES:
        valid = ", ".join(repr(p) for p in NONFINITE_POLICIES)
        raise ConfigurationError(f"{name} must be one of {valid}; got {value!r}")
    return value
