"""Loaders validate the whole dict first and refuse impossible states: nothing is loaded."""

import pytest
import torch

from gradstats.errors import StateError
from gradstats.moments import EMAMoments, RunningMoments
from gradstats.testing import assert_state_equal

NAN = float("nan")


def _running():
    return RunningMoments(3).update(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)))


def _ema():
    ema = EMAMoments(beta=0.9, shape=3)
    for step in range(3):
        ema.update(torch.full((3,), float(step)))
    return ema


def _without(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


def _with(key, value):
    return lambda state: {**state, key: value}


RUNNING_CASES = {
    "no-skipped-counter": (_without("skipped"), "lacks 'skipped'"),
    "both-counter-names": (_with("rejected", torch.tensor(0)), "both 'skipped' and its old"),
    "no-count": (_without("count"), "lacks 'count'"),
    "no-m2": (_without("m2"), "lacks 'm2'"),
    "no-shape": (_without("shape"), r"state_dict\['shape'\] must be a list"),
    "no-weights": (_without("weights"), "weights=None"),
    "count-shape-3": (_with("count", torch.zeros(3, dtype=torch.float64)), r"'count'.*shape"),
    "mean-shape": (_with("mean", torch.zeros(2, dtype=torch.float64)), r"'mean'.*shape"),
    "negative-m2": (_with("m2", torch.tensor([1.0, -0.5, 2.0])), r"'m2'.*negative"),
    "negative-count": (_with("count", torch.tensor(-2.0)), r"'count'.*negative"),
    "fractional-count": (_with("count", torch.tensor(2.5)), r"'count'.*whole"),
    "negative-weight-sum": (_with("weight_sum", torch.tensor(-1.0)), r"'weight_sum'.*negative"),
    "nan-mean": (_with("mean", torch.tensor([0.0, NAN, 1.0])), r"'mean'.*NaN"),
    "inf-m2": (_with("m2", torch.tensor([0.0, float("inf"), 1.0])), r"'m2'.*NaN or ±inf"),
    "nan-weight-sq-sum": (_with("weight_sq_sum", torch.tensor(NAN)), r"'weight_sq_sum'.*NaN"),
    "negative-skipped": (_with("skipped", torch.tensor(-1)), r"'skipped'.*negative"),
    "huge-skipped": (_with("skipped", torch.tensor(1e20, dtype=torch.float64)), "int64 range"),
    "list-mean": (_with("mean", [0.0, 0.0, 0.0]), r"'mean'.*must be a tensor"),
    "complex-m2": (_with("m2", torch.zeros(3, dtype=torch.complex64)), r"'m2'.*real"),
    "bool-count": (_with("count", torch.tensor(True)), r"'count'.*real"),
    "shape-mismatch": (_with("shape", [4]), "has shape"),
    "version": (_with("version", 2), "version"),
    "not-a-dict": (lambda state: [state], "is not a gradstats.RunningMoments state dict"),
}


@pytest.mark.parametrize("case", list(RUNNING_CASES), ids=list(RUNNING_CASES))
def test_running_moments_refuses_a_bad_state_and_loads_nothing(case):
    edit, match = RUNNING_CASES[case]
    target = _running()
    before = target.state_dict()
    bad = edit(_running().update(torch.ones(2, 3)).state_dict())
    with pytest.raises(StateError, match=match):
        target.load_state_dict(bad)
    assert_state_equal(target.state_dict(), before)


EMA_CASES = {
    "no-skipped": (_without("skipped"), "lacks 'skipped'"),
    "no-beta": (_without("beta"), "beta=None"),
    "no-variance": (_without("variance"), "lacks 'variance'"),
    "count-shape-3": (_with("count", torch.zeros(3, dtype=torch.int64)), r"'count'.*shape"),
    "negative-count": (_with("count", torch.tensor(-1)), r"'count'.*negative"),
    "fractional-count": (_with("count", torch.tensor(1.5)), r"'count'.*whole"),
    "negative-variance": (_with("variance", torch.tensor([0.1, -1.0, 0.0])), "'variance'.*neg"),
    "nan-variance": (_with("variance", torch.tensor([NAN, 0.0, 0.0])), r"'variance'.*NaN"),
    "inf-shift": (_with("shift", torch.tensor([float("inf"), 0.0, 0.0])), r"'shift'.*±inf"),
    "nan-mean": (_with("mean", torch.full((3,), NAN)), r"'mean'.*NaN"),
    "negative-skipped": (_with("skipped", torch.tensor(-3)), r"'skipped'.*negative"),
    "huge-count": (_with("count", torch.tensor(1e20, dtype=torch.float64)), "int64 range"),
    "shape-mismatch": (_with("shape", [2]), "has shape"),
    "string-shape": (_with("shape", "3"), r"'shape'\] must be a list"),
    "wrong-format": (_with("format", "gradstats.RunningMoments"), "not a gradstats.EMAMoments"),
}


@pytest.mark.parametrize("case", list(EMA_CASES), ids=list(EMA_CASES))
def test_ema_moments_refuses_a_bad_state_and_loads_nothing(case):
    edit, match = EMA_CASES[case]
    target = _ema()
    before = target.state_dict()
    bad = edit(_ema().update(torch.ones(3)).state_dict())
    with pytest.raises(StateError, match=match):
        target.load_state_dict(bad)
    assert_state_equal(target.state_dict(), before)


@pytest.mark.parametrize("make", [_running, _ema], ids=["running", "ema"])
def test_a_valid_state_dict_round_trips_exactly(make):
    source = make()
    target = type(source)(**({"beta": 0.9, "shape": 3} if make is _ema else {"shape": 3}))
    target.load_state_dict(source.state_dict())
    assert_state_equal(target.state_dict(), source.state_dict())


def test_an_integer_count_state_loads():
    """Counts saved as integers (e.g. by hand) are whole numbers and load fine."""
    state = _running().state_dict()
    state["count"] = torch.tensor(5)
    target = RunningMoments(3)
    target.load_state_dict(state)
    assert target.count.dtype == torch.float64
    assert target.count.item() == 5
