"""Streaming moments shared by every gradstats pillar.

* :class:`RunningMoments` — exact weighted mean / variance / standard error of a sample, updated
  in any split, merged in any order (Chan), reduced over ``torch.distributed`` ranks.
* :class:`EMAMoments` — exponential moving mean / variance, zero-initialised and debiased by
  1 − β^t with a per-buffer count, deviation-form updates, reliability correction ρ_w.

Both keep their state on the data's device, never read values back to the host while updating,
skip non-finite input instead of being poisoned by it, and carry ``state_dict`` /
``load_state_dict``.
"""

from gradstats.moments._ema import EMAMoments, ema_reliability, ema_step_size, ema_update
from gradstats.moments._running import RunningMoments

__all__ = ["EMAMoments", "RunningMoments", "ema_reliability", "ema_step_size", "ema_update"]
