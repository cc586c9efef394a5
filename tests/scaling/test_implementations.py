"""The fast foreach path equals the readable per-coordinate reference path (float64)."""

import pytest
import torch

from ._helpers import feed, make, params_like

SHAPES = ((6, 4), (5,), (0,), (3, 2, 2))


def _steps(seed):
    g = torch.Generator().manual_seed(seed)
    steps = []
    for k in range(9):
        grads = [torch.randn(s, generator=g) + 0.3 * k for s in SHAPES]
        if k in (2, 5):
            grads[1] = None  # tensor 1 frozen on some steps
        if k == 4:
            grads[3] = torch.full(SHAPES[3], float("nan"))  # a skipped (non-finite) step
        steps.append(grads)
    return steps


FIELDS = ("variance", "variance_unbiased", "signal", "signal_unbiased", "factor", "count")


def _numbers(stats):
    return {(name, f): getattr(row, f) for name, row in stats.items() for f in FIELDS}


@pytest.mark.parametrize("aggregate", ["global", "tensor"])
@pytest.mark.parametrize("steps", range(1, 10))
def test_foreach_equals_reference_after_several_steps(aggregate, steps):
    fast_named, ref_named = params_like(*SHAPES), params_like(*SHAPES)
    fast = feed(make(fast_named, beta=0.8, aggregate=aggregate), fast_named, _steps(0)[:steps])
    ref = feed(
        make(ref_named, beta=0.8, aggregate=aggregate, foreach=False), ref_named, _steps(0)[:steps]
    )
    a, b = _numbers(fast.statistics()), _numbers(ref.statistics())
    assert a == pytest.approx(b, rel=1e-12, abs=1e-14, nan_ok=True)


def test_counts_skip_missing_gradients_and_non_finite_steps():
    named = params_like(*SHAPES)
    stats = feed(make(named, beta=0.8), named, _steps(0)).statistics()
    assert stats["global"].skipped == 1
    assert stats["p1"].count == 6  # 9 steps − 2 without gradient − 1 skipped
    assert stats["p2"].count == 8  # the zero-size tensor counts its (empty) observations
