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


@pytest.mark.parametrize("aggregate", ["global", "tensor"])
def test_foreach_equals_reference_over_several_steps(aggregate):
    fast_named, ref_named = params_like(*SHAPES), params_like(*SHAPES)
    fast = make(fast_named, beta=0.8, aggregate=aggregate)
    ref = make(ref_named, beta=0.8, aggregate=aggregate, foreach=False)
    for grads in _steps(0):
        feed(fast, fast_named, [grads])
        feed(ref, ref_named, [grads])
        a, b = fast.statistics(), ref.statistics()
        for name in [n for n, _ in fast_named] + ["global"]:
            for field in (
                "variance",
                "variance_unbiased",
                "signal",
                "signal_unbiased",
                "factor",
                "count",
            ):
                x, y = getattr(a[name], field), getattr(b[name], field)
                assert x == pytest.approx(y, rel=1e-12, abs=1e-14, nan_ok=True), (name, field)
    assert a["global"].skipped_steps == 1
    assert a["p1"].count == 6  # 9 steps − 2 without gradient − 1 skipped
    assert a["p2"].count == 8  # the zero-size tensor counts its (empty) observations
