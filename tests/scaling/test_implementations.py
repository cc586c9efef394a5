"""The fast foreach path equals the readable per-coordinate reference path (float64, float32)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


# float32: m is stored in float32 by both paths, δ rounded once more by the fast one
TOLERANCE = {torch.float64: {"rel": 1e-12, "abs": 1e-14}, torch.float32: {"rel": 2e-6, "abs": 1e-6}}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("aggregate", ["global", "tensor"])
@pytest.mark.parametrize("steps", range(1, 10))
def test_foreach_equals_reference_after_several_steps(aggregate, steps, dtype):
    fast_named, ref_named = params_like(*SHAPES, dtype=dtype), params_like(*SHAPES, dtype=dtype)
    fast = feed(
        make(fast_named, beta=0.8, aggregate=aggregate, statistic="temporal", rule="shrink"),
        fast_named,
        _steps(0)[:steps],
    )
    ref = feed(
        make(
            ref_named,
            beta=0.8,
            aggregate=aggregate,
            foreach=False,
            statistic="temporal",
            rule="shrink",
        ),
        ref_named,
        _steps(0)[:steps],
    )
    a, b = _numbers(fast.statistics()), _numbers(ref.statistics())
    assert a == pytest.approx(b, nan_ok=True, **TOLERANCE[dtype])


def test_counts_skip_missing_gradients_and_non_finite_steps():
    named = params_like(*SHAPES)
    stats = feed(
        make(named, beta=0.8, statistic="temporal", rule="shrink"), named, _steps(0)
    ).statistics()
    assert stats["global"].skipped == 1
    assert stats["p1"].count == 6  # 9 steps − 2 without gradient − 1 skipped
    assert stats["p2"].count == 8  # the zero-size tensor counts its (empty) observations


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_per_update(tensors, foreach=True):
    named = [(f"p{i}", torch.nn.Parameter(torch.zeros(3, 5))) for i in range(tensors)]
    for _, p in named:
        p.grad = torch.randn(3, 5)
    vgs = make(named, foreach=foreach, statistic="temporal", rule="shrink")
    vgs.update_statistics()  # first use allocates the scratch
    vgs.update_statistics()
    with _CountOps() as ops:
        vgs.update_statistics()
    return ops.count


def test_fast_update_issues_as_many_ops_for_4_as_for_64_tensors():
    assert _ops_per_update(4) == _ops_per_update(64)


def test_reference_update_issues_ops_per_tensor():
    assert _ops_per_update(64, foreach=False) > _ops_per_update(4, foreach=False)


MIXED = (
    (torch.float32, (4, 3)),
    (torch.float64, (5,)),
    (torch.bfloat16, (2, 3)),
    (torch.float16, (6,)),
)


def _mixed(foreach):
    named = [
        (f"p{i}", torch.nn.Parameter(torch.zeros(s, dtype=d))) for i, (d, s) in enumerate(MIXED)
    ]
    vgs = make(named, beta=0.8, foreach=foreach, statistic="temporal", rule="shrink")
    g = torch.Generator().manual_seed(3)
    for k in range(6):
        for (_, p), (d, s) in zip(named, MIXED, strict=True):
            p.grad = (torch.randn(s, generator=g) + 0.5 * k).to(d)
        vgs.step()
    return vgs


def test_foreach_equals_reference_over_mixed_dtypes():
    a, b = _numbers(_mixed(True).statistics()), _numbers(_mixed(False).statistics())
    assert a == pytest.approx(b, rel=2e-6, abs=1e-6, nan_ok=True)
