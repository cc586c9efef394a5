"""The factor 1/(1 + αρ): aggregation, states, bounds, rate limit, warm-up, confidence gate."""

import math

import pytest
import torch

from gradstats.testing import reference_scaler_statistics

from ._helpers import feed, make, params_like


def _history(seed, size, steps=12, mean=1.0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    base = mean * torch.randn(size, generator=g)
    return [base + noise * torch.randn(size, generator=g) for _ in range(steps)]


def test_factor_is_one_over_one_plus_alpha_rho():
    history = _history(0, 20)
    named = params_like(20)
    vgs = feed(
        make(named, alpha=2.0, beta=0.9, statistic="temporal", rule="shrink"),
        named,
        [[h] for h in history],
    )
    ref = reference_scaler_statistics(history, 0.9)
    rho = ref["temporal_noise"] / ref["temporal_signal"]
    assert vgs.get_normalized_variance() == pytest.approx(rho, rel=1e-12)
    assert vgs.get_scaling_factor() == pytest.approx(1 / (1 + 2 * rho), rel=1e-12)


def test_ratio_of_sums_over_tensors_excludes_tensors_without_gradients():
    a, b, frozen = _history(1, 10), _history(2, 7), _history(3, 5)
    named = params_like(10, 7, 5)
    steps = [[x, y, z] for x, y, z in zip(a, b, frozen, strict=True)]
    steps[-1][2] = None  # the third tensor has no gradient on the last step
    vgs = feed(make(named, beta=0.9, statistic="temporal", rule="shrink"), named, steps)
    ra, rb = reference_scaler_statistics(a, 0.9), reference_scaler_statistics(b, 0.9)
    rho = (ra["temporal_noise"] + rb["temporal_noise"]) / (
        ra["temporal_signal"] + rb["temporal_signal"]
    )
    assert vgs.get_normalized_variance() == pytest.approx(rho, rel=1e-12)
    stats = vgs.statistics()
    assert stats["global"].members == 2
    assert stats["p2"].count == 11  # a step without a gradient does not advance its count
    assert stats["p2"].has_gradient is False


def test_requires_grad_false_tensors_are_left_out():
    frozen = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    live = torch.nn.Parameter(torch.zeros(3))
    vgs = make([("frozen", frozen), ("live", live)], statistic="temporal", rule="shrink")
    assert vgs.layout.names == ("live",)


def test_no_estimate_before_two_observations_gives_factor_one():
    named = params_like(5)
    vgs = feed(make(named, statistic="temporal", rule="shrink"), named, [[torch.ones(5)]])
    assert math.isnan(vgs.get_normalized_variance())
    assert vgs.get_scaling_factor() == 1.0
    assert vgs.statistics()["global"].no_estimate


def test_no_detectable_signal_gives_min_scale_not_a_division_by_eps():
    named = params_like(4)
    steps = [[torch.tensor([1.0, -1.0, 1.0, -1.0]) * (-1) ** k] for k in range(6)]  # pure noise
    vgs = feed(
        make(named, min_scale=0.05, beta=0.5, statistic="temporal", rule="shrink"), named, steps
    )
    row = vgs.statistics()["global"]
    assert row.no_signal
    assert math.isinf(row.normalized_variance)
    assert row.factor == 0.05


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 3.0])
def test_alpha_scales_rho(alpha):
    history = _history(4, 8)
    named = params_like(8)
    vgs = feed(
        make(named, alpha=alpha, beta=0.9, statistic="temporal", rule="shrink"),
        named,
        [[h] for h in history],
    )
    rho = vgs.get_normalized_variance()
    assert vgs.get_scaling_factor() == pytest.approx(1 / (1 + alpha * rho), rel=1e-12)


def test_warmup_steps_hold_the_factor_at_one():
    history = _history(5, 8, noise=3.0)
    named = params_like(8)
    vgs = make(named, warmup_steps=5, beta=0.9, statistic="temporal", rule="shrink")
    factors = []
    for h in history:
        feed(vgs, named, [[h]])
        factors.append(vgs.get_scaling_factor())
    assert factors[:5] == [1.0] * 5
    assert all(f < 1.0 for f in factors[5:])


def test_confidence_gate_waits_for_enough_effective_samples():
    history = _history(6, 8, noise=3.0, steps=40)
    named = params_like(8)
    vgs = make(named, confidence=0.5, beta=0.99, statistic="temporal", rule="shrink")
    opened = None
    for step, h in enumerate(history, start=1):
        feed(vgs, named, [[h]])
        row = vgs.statistics()["global"]
        if opened is None and row.gate_open:
            opened = step
            assert math.sqrt(2 / (row.effective_sample_size - 1)) <= 0.5
    assert opened == 10  # n_eff(t) ≈ t for t ≪ 1/(1 − β): needs n_eff >= 9


def test_bounds_and_rate_limit():
    named = params_like(6)
    quiet = _history(7, 6, noise=0.01, steps=6)
    loud = _history(7, 6, noise=50.0, steps=6)
    vgs = make(named, beta=0.5, min_scale=0.2, max_rate=0.1, statistic="temporal", rule="shrink")
    feed(vgs, named, [[h] for h in quiet])
    previous = vgs.get_scaling_factor()
    for h in loud:
        feed(vgs, named, [[h]])
        current = vgs.get_scaling_factor()
        assert abs(math.log(current) - math.log(previous)) <= 0.1 + 1e-12
        assert current >= 0.2
        previous = current


def test_param_group_aggregation_gives_one_factor_per_group():
    quiet, loud = _history(8, 5, noise=0.05), _history(9, 5, noise=5.0)
    p0, p1 = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.SGD([{"params": [p0]}, {"params": [p1]}], lr=0.1)
    vgs = make(
        [("quiet", p0), ("loud", p1)],
        aggregate="param_group",
        optimizer=opt,
        beta=0.9,
        statistic="temporal",
        rule="shrink",
    )
    feed(vgs, [("quiet", p0), ("loud", p1)], [[a, b] for a, b in zip(quiet, loud, strict=True)])
    stats = vgs.statistics()
    assert stats["group0"].factor > 0.9 > 0.5 > stats["group1"].factor
    assert stats["quiet"].factor == stats["group0"].factor


@pytest.mark.parametrize(("index", "seed", "noise"), [(0, 8, 0.05), (1, 9, 5.0)])
def test_tensor_aggregation_gives_each_tensor_its_own_factor(index, seed, noise):
    histories = [_history(8, 5, noise=0.05), _history(9, 5, noise=5.0)]
    named = params_like(5, 5)
    vgs = feed(
        make(named, aggregate="tensor", beta=0.9, statistic="temporal", rule="shrink"),
        named,
        [list(pair) for pair in zip(*histories, strict=True)],
    )
    ref = reference_scaler_statistics(_history(seed, 5, noise=noise), 0.9)
    assert vgs.statistics()[f"p{index}"].factor == pytest.approx(
        1 / (1 + ref["temporal_noise"] / ref["temporal_signal"]), rel=1e-12
    )


@pytest.mark.parametrize("c", [1e-3, 7.0, 1e4])
def test_scaling_all_gradients_does_not_change_rho_or_the_factor(c):
    history = _history(10, 12)
    named_a, named_b = params_like(12), params_like(12)
    a = feed(
        make(named_a, beta=0.9, statistic="temporal", rule="shrink"),
        named_a,
        [[h] for h in history],
    )
    b = feed(
        make(named_b, beta=0.9, statistic="temporal", rule="shrink"),
        named_b,
        [[c * h] for h in history],
    )
    assert b.get_normalized_variance() == pytest.approx(a.get_normalized_variance(), rel=1e-10)


def test_permuting_coordinates_and_tensors_does_not_change_the_global_rho():
    h1, h2 = _history(11, 9), _history(12, 4)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    named_a, named_b = params_like(9, 4), params_like(4, 9)
    a = feed(
        make(named_a, beta=0.8, statistic="temporal", rule="shrink"),
        named_a,
        [[x, y] for x, y in zip(h1, h2, strict=True)],
    )
    b = feed(
        make(named_b, beta=0.8, statistic="temporal", rule="shrink"),
        named_b,
        [[y, x[perm]] for x, y in zip(h1, h2, strict=True)],
    )
    assert b.get_normalized_variance() == pytest.approx(a.get_normalized_variance(), rel=1e-12)
