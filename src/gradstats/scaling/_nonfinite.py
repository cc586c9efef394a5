r"""``max_nonfinite_steps``: exact, with about one host read every N updates.

The scaler counts consecutive non-finite steps on the device (c_t = 0 after a finite step,
c_{t−1} + 1 after a non-finite one). It must raise at the first update t with c_t = N, yet
reading c_t every step would be a host sync on the hot path. Since c grows by at most one per
update, a read at update t₀ that finds c_{t₀} = c₀ < N proves c_t < N for every
t < t₀ + (N − c₀): the next read is scheduled exactly there. If it finds c = N, this is the first
update at which the limit is reached (it could not have been reached earlier); otherwise the next
read is rescheduled the same way. So the error is raised at exactly the N-th consecutive
non-finite step, and a healthy run (c = 0) pays one host read every N updates — the documented
sync points of ``max_nonfinite_steps``. Each read also warns about newly skipped non-finite steps.

>>> monitor = ConsecutiveLimit()
>>> monitor.due(updates=3, limit=4)  # c_0 = 0: c_3 <= 3 < 4, no read needed
False
>>> monitor.due(updates=4, limit=4)
True
>>> monitor.schedule(updates=4, limit=4, consecutive=1)  # read: c_4 = 1
7
"""

from __future__ import annotations

import torch

from gradstats._warnings import warn
from gradstats.errors import ConfigurationError, ConfigurationTypeError, NonFiniteError

__all__ = ["ConsecutiveLimit", "check_skip"]


class ConsecutiveLimit:
    """When to read the device counters, and what to do with what they say."""

    def __init__(self) -> None:
        self.reset(updates=0, consecutive=0, seen=0)

    def reset(self, updates: int, consecutive: int, seen: int) -> None:
        """The counters are known on the host: c = ``consecutive`` after update ``updates``
        and ``seen`` non-finite steps so far (a new scaler, a load, a reset)."""
        self._base, self._known, self._seen = updates, consecutive, seen
        self._limit: int | None = None
        self._check_at = updates + 1

    def due(self, updates: int, limit: int | None) -> bool:
        """Whether the counters must be read after update ``updates``."""
        if limit is None:
            return False
        if limit != self._limit:  # first use, or a new limit: schedule from the last known c
            self._limit = limit
            self._check_at = self._base + max(limit - self._known, 1)
        return updates >= self._check_at

    def schedule(self, updates: int, limit: int, consecutive: int) -> int:
        """c = ``consecutive`` after update ``updates``: the first update at which it can
        reach ``limit``."""
        self._base, self._known = updates, consecutive
        self._check_at = updates + max(limit - consecutive, 1)
        return self._check_at

    def check(
        self,
        updates: int,
        limit: int | None,
        consecutive: torch.Tensor,
        nonfinite: torch.Tensor,
    ) -> None:
        """After update ``updates``: read the counters if due; warn; raise at the limit."""
        if limit is None or not self.due(updates, limit):
            return
        c, total = torch.stack([consecutive, nonfinite]).tolist()  # sync-ok: scheduled read
        if total > self._seen:
            warn(f"{total - self._seen} steps with non-finite gradients were skipped by the scaler")
            self._seen = total
        if c >= limit:
            raise NonFiniteError(
                f"{c} consecutive steps had non-finite gradients (limit max_nonfinite_steps="
                f"{limit}, reached at update {updates}); the scaler skipped them, but training "
                "is diverging"
            )
        self.schedule(updates, limit, c)


def check_skip(skip: object) -> None:
    """``skip`` is None, a bool, or a 0-dim tensor (bool, or numeric: non-zero means skip, as
    AMP's ``found_inf``); anything else is refused before the scaler changes."""
    if skip is None or isinstance(skip, bool):
        return
    if not isinstance(skip, torch.Tensor):
        raise ConfigurationTypeError(
            f"skip must be a bool or a 0-dim tensor; got {type(skip).__name__}"
        )
    if skip.dim() != 0 or skip.is_complex():
        raise ConfigurationError(
            f"skip must be a 0-dim bool or real tensor; got shape {tuple(skip.shape)}, "
            f"dtype {skip.dtype}"
        )
