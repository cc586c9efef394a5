"""Streaming moments shared by every gradstats pillar.

* :class:`RunningMoments` — exact weighted mean / variance / standard error of a sample, updated
  in any split, merged in any order (Chan), reduced over ``torch.distributed`` ranks.
* :class:`EMAMoments` — exponential moving mean / variance, zero-initialised and debiased by
  1 − β^t with a per-buffer count, deviation-form updates, reliability correction ρ_w.

Both keep their state on the data's device, never read values back to the host while updating,
and follow the library's one non-finite policy (``nonfinite="skip"``, the default: a non-finite
contribution is dropped whole and counted in ``skipped``; ``nonfinite="raise"``:
:class:`~gradstats.errors.NonFiniteError` before anything changes). ``state_dict`` /
``load_state_dict`` round-trip the state; loading validates the whole dict first and refuses
impossible states with :class:`~gradstats.errors.StateError`.
"""

from gradstats.moments._ema import EMAMoments, ema_reliability, ema_step_size, ema_update
from gradstats.moments._running import RunningMoments

__all__ = ["EMAMoments", "RunningMoments", "ema_reliability", "ema_step_size", "ema_update"]
