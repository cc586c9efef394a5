"""The Fisher suite's cost floors compute what the collector computes (else they are no floor)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradstats.bench.suites._fisher_floors import ef_checked_floor, ef_floor, ef_groups_floor
from gradstats.fisher import FisherCollector
from gradstats.fisher._state_pending import FOLD_EVERY


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def _data(n=7):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,))


def test_floors_give_the_collectors_sums_of_squares():
    model, (x, y) = _mlp(), _data()
    fc = FisherCollector(model, "empirical", signal=False, groups=None).collect(x, y)
    expected = fc.fisher("none")
    for make in (ef_floor, ef_checked_floor):
        sq = make(copy.deepcopy(model), x, y)()["sq"]
        names = ["0.weight", "2.weight", "0.bias", "2.bias"]
        for name, value in zip(names, sq, strict=True):
            torch.testing.assert_close(value, expected[name])


def test_checked_floor_refuses_bad_targets_and_skips_nonfinite_batches():
    model, (x, y) = _mlp(), _data()
    with pytest.raises(ValueError, match="range"):
        ef_checked_floor(copy.deepcopy(model), x, torch.full_like(y, 3))()
    bad = x.clone()
    bad[0, 0] = float("nan")
    run = ef_checked_floor(copy.deepcopy(model), bad, y)
    assert all(not t.any() for t in run()["sq"])  # nothing added


def test_checked_floor_folds_into_float64_totals():
    model, (x, y) = _mlp(), _data()
    run = ef_checked_floor(copy.deepcopy(model), x, y)
    for _ in range(FOLD_EVERY):
        pending = run()["sq"]
    assert all(not t.any() for t in pending)  # folded and zeroed


@pytest.mark.parametrize("make", [ef_floor, ef_checked_floor, ef_groups_floor])
def test_floors_build_no_autograd_graph(make):
    """A floor's sums hold no history: an in-place product of a tensor that requires grad,
    outside ``no_grad``, would chain every call's graph to the buffers (a floor that grows in
    memory and time with each call, as ef_floor and ef_groups_floor once did)."""
    import gc

    model, (x, y) = _mlp(), _data()
    run = make(copy.deepcopy(model), x, y)
    out = run()
    gc.collect()
    before = sum(type(o) is torch.Tensor for o in gc.get_objects())
    for _ in range(20):
        out = run()
    gc.collect()
    after = sum(type(o) is torch.Tensor for o in gc.get_objects())
    assert all(t.grad_fn is None and not t.requires_grad for ts in out.values() for t in ts)
    assert after - before < 20  # nothing kept per call
