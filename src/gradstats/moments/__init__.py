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

The functional layer under both, for statistics kept elementwise by another object (the Fisher
state's per-element Chan merge):

* :class:`Moments` — the sufficient statistics (n, W = Σw, W₂ = Σw², mean, M2) of a sample.
* :func:`combine` — Chan's exact merge of two summaries: with δ = mean_B − mean_A,
  W = W_A + W_B, mean = mean_A + δ W_B / W, M2 = M2_A + M2_B + δ² W_A W_B / W.
* :func:`safe_inverse` — 1/w where w > 0, else 0 (no host sync, no NaN).
* :func:`all_reduce_moments` / :func:`all_reduce_sum_` — the same over ``torch.distributed``
  ranks (no-ops without a process group).

Example (merge [1, 2] with [3, 4]: n 4, mean 2.5, M2 5.0):
    >>> import torch
    >>> one = torch.ones((), dtype=torch.float64)
    >>> a = Moments(2 * one, 2 * one, 2 * one, 1.5 * one, 0.5 * one)
    >>> b = Moments(2 * one, 2 * one, 2 * one, 3.5 * one, 0.5 * one)
    >>> merged = combine(a, b)
    >>> merged.count.item(), merged.mean.item(), merged.m2.item()  # sync-ok: an example
    (4.0, 2.5, 5.0)
"""

from gradstats.moments._distributed import all_reduce_moments, all_reduce_sum_
from gradstats.moments._ema import (
    EMAMoments,
    ema_reliability,
    ema_step_size,
    ema_step_sizes,
    ema_update,
)
from gradstats.moments._running import RunningMoments
from gradstats.moments._welford import Moments, combine, safe_inverse

__all__ = [
    "EMAMoments",
    "Moments",
    "RunningMoments",
    "all_reduce_moments",
    "all_reduce_sum_",
    "combine",
    "ema_reliability",
    "ema_step_size",
    "ema_step_sizes",
    "ema_update",
    "safe_inverse",
]
