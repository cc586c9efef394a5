"""The one non-finite policy: ``nonfinite="skip"`` drops a step on the device and counts it in
``skipped``; ``max_nonfinite_steps`` fires at exactly N consecutive ones; ``"raise"`` raises
NonFiniteError before anything changes."""

import warnings

import pytest
import torch

from gradstats.errors import GradstatsError, NonFiniteError

from ._helpers import assert_same, feed, make, params_like, snapshot

NAN = [torch.full((2,), float("nan"))]


def _finite(k):
    return [
        torch.full((3,), float(k)) + torch.tensor([0.0, 1.0, -1.0]) * (k % 3),
        torch.ones(2) * k,
    ]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_step_changes_nothing_but_the_counters(bad):
    named_a, named_b = params_like(3, 2), params_like(3, 2)
    clean = make(named_a, beta=0.9, statistic="temporal", rule="shrink")
    dirty = make(named_b, beta=0.9, statistic="temporal", rule="shrink")
    for k in range(6):
        feed(clean, named_a, [_finite(k)])
        feed(dirty, named_b, [_finite(k)])
        if k == 3:
            poisoned = _finite(k)
            poisoned[0][1] = bad
            feed(dirty, named_b, [poisoned])
    a, b = clean.state_dict(), dirty.state_dict()
    assert_same(a["tensors"], b["tensors"])
    assert_same(a["factor"], b["factor"])
    assert b["counters"]["skipped"].item() == 1
    stats = dirty.statistics()["global"]
    assert (stats.nonfinite_steps, stats.skipped, stats.updates) == (1, 1, 7)
    assert clean.get_scaling_factor() == dirty.get_scaling_factor()


def test_skipped_is_a_device_counter():
    named = params_like(2)
    vgs = feed(make(named, statistic="temporal", rule="shrink"), named, [[torch.ones(2)], NAN, NAN])
    assert isinstance(vgs.skipped, torch.Tensor)
    assert vgs.skipped.dtype == torch.int64
    assert int(vgs.skipped) == 2


def test_user_skip_flag_skips_the_update():
    named = params_like(3, 2)
    vgs = make(named, beta=0.9, statistic="temporal", rule="shrink")
    feed(vgs, named, [_finite(1), _finite(2)])
    before = vgs.state_dict()
    feed(vgs, named, [_finite(5)], skip=torch.tensor(True))
    assert_same(before["tensors"], vgs.state_dict()["tensors"])
    assert vgs.statistics()["global"].skipped == 1


@pytest.mark.parametrize("statistic", ["temporal", "same_point", "tensor_mean"])
def test_raise_policy_raises_before_changing_anything(statistic):
    named = params_like(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensor_mean is a legacy diagnostic
        vgs = make(named, beta=0.9, statistic=statistic, nonfinite="raise", rule="shrink")
    feed(vgs, named, [_finite(1), _finite(2), _finite(3)])
    before = snapshot(vgs)
    poisoned = _finite(4)
    poisoned[1][0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"update 4 hold NaN or inf \(nonfinite='raise'"):
        feed(vgs, named, [poisoned])
    assert_same(before, snapshot(vgs))


def test_raise_policy_error_is_a_floating_point_error():
    named = params_like(2)
    vgs = make(named, nonfinite="raise", statistic="temporal", rule="shrink")
    with pytest.raises(FloatingPointError) as info:
        feed(vgs, named, [NAN])
    assert isinstance(info.value, GradstatsError)


def test_raise_policy_accepts_the_step_once_the_gradients_are_finite():
    named = params_like(2)
    vgs = make(named, nonfinite="raise", statistic="temporal", rule="shrink")
    with pytest.raises(NonFiniteError):
        feed(vgs, named, [NAN])
    feed(vgs, named, [[torch.ones(2)]])
    assert vgs.updates == 1


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("finite_before", [0, 1, 2, 5, 9])
def test_limit_fires_at_exactly_n_consecutive_non_finite_steps(limit, finite_before):
    named = params_like(2)
    vgs = make(named, max_nonfinite_steps=limit, statistic="temporal", rule="shrink")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped-steps warning
        feed(vgs, named, [[torch.ones(2) * (k + 1)] for k in range(finite_before)])
        feed(vgs, named, [NAN] * (limit - 1))  # N - 1: no error yet
        with pytest.raises(NonFiniteError, match=f"{limit} consecutive steps had non-finite"):
            feed(vgs, named, [NAN])
    assert vgs.updates == finite_before + limit
    assert int(vgs.skipped) == limit


@pytest.mark.parametrize("limit", [2, 3, 5])
def test_runs_shorter_than_the_limit_never_fire(limit):
    named = params_like(2)
    vgs = make(named, max_nonfinite_steps=limit, statistic="temporal", rule="shrink")
    run = [NAN] * (limit - 1) + [[torch.ones(2)]]
    with pytest.warns(UserWarning, match="non-finite gradients were skipped"):
        feed(vgs, named, run * 6)
    assert int(vgs.skipped) == 6 * (limit - 1)


def test_the_limit_error_is_a_floating_point_error():
    named = params_like(2)
    vgs = make(named, max_nonfinite_steps=2, statistic="temporal", rule="shrink")
    with (
        pytest.warns(UserWarning, match="skipped"),
        pytest.raises(FloatingPointError, match="2 con"),
    ):
        feed(vgs, named, [NAN] * 2)


def test_a_healthy_run_reads_the_counters_once_every_n_updates(monkeypatch):
    named = params_like(2)
    vgs = make(named, max_nonfinite_steps=10, log_every=10**6, statistic="temporal", rule="shrink")
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or original(t))
    feed(vgs, named, [[torch.ones(2) * k] for k in range(40)])
    assert len(reads) == 4


def test_without_a_limit_the_counters_are_never_read(monkeypatch):
    named = params_like(2)
    vgs = make(
        named, max_nonfinite_steps=None, log_every=10**6, statistic="temporal", rule="shrink"
    )
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or original(t))
    feed(vgs, named, [NAN] * 30)
    assert reads == []


def test_the_limit_counts_a_run_that_spans_a_checkpoint():
    named = params_like(2)
    vgs = make(named, max_nonfinite_steps=4, statistic="temporal", rule="shrink")
    with pytest.warns(UserWarning, match="3 steps with non-finite gradients were skipped"):
        feed(vgs, named, [[torch.ones(2)]] + [NAN] * 3)
    state = vgs.state_dict()
    resumed_named = params_like(2)
    resumed = make(resumed_named, max_nonfinite_steps=4, statistic="temporal", rule="shrink")
    resumed.load_state_dict(state)
    with (
        pytest.warns(UserWarning, match="^1 steps with non-finite"),
        pytest.raises(NonFiniteError, match="reached at update 5"),
    ):
        feed(resumed, resumed_named, [NAN])


def test_isolated_non_finite_steps_only_warn():
    named = params_like(2)
    vgs = make(named, max_nonfinite_steps=4, statistic="temporal", rule="shrink")
    steps = [NAN if k % 3 == 0 else [torch.ones(2) * k] for k in range(12)]
    with pytest.warns(UserWarning, match="non-finite gradients were skipped"):
        feed(vgs, named, steps)
    assert vgs.statistics()["global"].nonfinite_steps == 4


def test_skipped_steps_is_a_deprecated_alias_of_skipped():
    named = params_like(2)
    vgs = feed(
        make(named, max_nonfinite_steps=None, statistic="temporal", rule="shrink"), named, [NAN]
    )
    row = vgs.statistics()["global"]
    with pytest.warns(FutureWarning, match=r"skipped_steps is deprecated; use \.skipped"):
        assert row.skipped_steps == row.skipped == 1


def test_logger_metric_skipped_steps_is_a_deprecated_alias():
    records = []
    named = params_like(2)
    vgs = make(
        named,
        log_every=1,
        max_nonfinite_steps=None,
        logger=lambda m, s: records.append(m),
        statistic="temporal",
        rule="shrink",
    )
    feed(vgs, named, [NAN])
    metrics = records[-1]
    assert metrics["vgs/skipped"] == 1.0
    assert "vgs/skipped_steps" not in metrics
    with pytest.warns(FutureWarning, match="'vgs/skipped_steps' is deprecated; use 'vgs/skipped'"):
        assert metrics["vgs/skipped_steps"] == 1.0
