"""Golden numbers (spec/scaling.md §1–2) and exact identities of every statistic."""

import warnings

import pytest
import torch

from gradstats.testing import reference_scaler_statistics

from ._helpers import feed, make, params_like

BETA = 0.99


def _stats(statistic, steps, shape, beta=BETA, foreach=True):
    named = params_like(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy diagnostics warn on construction
        vgs = make(named, statistic=statistic, beta=beta, foreach=foreach, rule="shrink")
    feed(vgs, named, [[s] for s in steps])
    return vgs.statistics()["p0"]


UNIFORM = [torch.full((5,), float(v)) for v in (1, 2, 3, 4)]


@pytest.mark.parametrize("foreach", [True, False])
def test_uniform_means_one_to_four_temporal(foreach):
    row = _stats("temporal", UNIFORM, 5, foreach=foreach)
    assert row.variance == pytest.approx(1.2498926845788585, rel=1e-12)
    assert row.variance_unbiased == pytest.approx(1.6665937190836144, rel=1e-12)
    assert row.signal == pytest.approx(2.512562560288946**2, rel=1e-12)


@pytest.mark.parametrize(
    ("statistic", "value"),
    [("tensor_mean", 1.2498926845788585), ("spatial", 0.0), ("mixed", 1.2498926845788585)],
)
def test_uniform_means_one_to_four_diagnostics(statistic, value):
    assert _stats(statistic, UNIFORM, 5).variance == pytest.approx(value, rel=1e-12, abs=1e-15)


ANTI = [torch.tensor([0.0, 2.0]), torch.tensor([2.0, 0.0])]


@pytest.mark.parametrize(
    ("statistic", "value"),
    [("temporal", 0.9999747481124215), ("tensor_mean", 0.0), ("spatial", 1.0), ("mixed", 1.0)],
)
def test_anticorrelated_coordinates(statistic, value):
    """Per-coordinate noise is ≈1; the tensor mean never moves, so tensor_mean sees nothing."""
    assert _stats(statistic, ANTI, 2).variance == pytest.approx(value, rel=1e-12, abs=1e-15)


LINSPACE = [torch.linspace(-1, 1, 100, dtype=torch.float64)] * 6


@pytest.mark.parametrize(
    ("statistic", "value"), [("temporal", 0.0), ("tensor_mean", 0.0), ("mixed", 0.3400673400673401)]
)
def test_constant_linspace_has_no_noise(statistic, value):
    assert _stats(statistic, LINSPACE, 100).variance == pytest.approx(value, rel=1e-12, abs=1e-12)


def _spike(position):
    g = torch.zeros(10_000)
    g[position] = 10.0
    return g


@pytest.mark.parametrize(
    ("moving", "statistic", "expected"),
    [
        (False, "temporal", 0.0),
        (False, "mixed", 0.009999),
        (True, "mixed", 0.009999),
    ],
)
def test_sparse_spike_mixed_cannot_tell_fixed_from_moving(moving, statistic, expected):
    steps = [_spike(k if moving else 0) for k in range(8)]
    assert _stats(statistic, steps, 10_000).variance == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_moving_spike_is_noise_for_temporal():
    steps = [_spike(k) for k in range(8)]
    row = _stats("temporal", steps, 10_000)
    ref = reference_scaler_statistics(steps, BETA)
    assert row.variance > 1e-3
    assert row.variance == pytest.approx(ref["temporal_variance"], rel=1e-12)


def _random_history(seed, steps=9, size=30):
    g = torch.Generator().manual_seed(seed)
    drift = torch.randn(size, generator=g)
    return [drift + 0.7 * torch.randn(size, generator=g) + 0.1 * k for k in range(steps)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_identities_of_the_reference(seed):
    ref = reference_scaler_statistics(_random_history(seed), 0.8)
    assert ref["mixed"] == pytest.approx(
        ref["temporal_variance"] + ref["spread_of_mean"], rel=1e-12
    )
    assert ref["mixed"] - ref["tensor_mean"] == pytest.approx(ref["spatial"], rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("statistic", "key"),
    [
        ("temporal", "temporal_variance"),
        ("tensor_mean", "tensor_mean"),
        ("spatial", "spatial"),
        ("mixed", "mixed"),
    ],
)
def test_every_statistic_matches_the_reference_on_random_data(seed, statistic, key):
    history = _random_history(seed)
    ref = reference_scaler_statistics(history, 0.8)
    assert _stats(statistic, history, 30, beta=0.8).variance == pytest.approx(ref[key], rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_is_temporal_plus_the_spread_of_the_mean(seed):
    history = _random_history(seed)
    ref = reference_scaler_statistics(history, 0.8)
    mixed = _stats("mixed", history, 30, beta=0.8).variance
    temporal = _stats("temporal", history, 30, beta=0.8).variance
    assert mixed == pytest.approx(temporal + ref["spread_of_mean"], rel=1e-12)


@pytest.mark.parametrize("foreach", [True, False])
def test_temporal_noise_and_unbiased_signal_match_reference(foreach):
    history = _random_history(5)
    ref = reference_scaler_statistics(history, 0.9)
    row = _stats("temporal", history, 30, beta=0.9, foreach=foreach)
    assert row.variance_unbiased * 30 == pytest.approx(ref["temporal_noise"], rel=1e-12)
    assert row.signal_unbiased * 30 == pytest.approx(ref["temporal_signal"], rel=1e-12)
    assert row.normalized_variance == pytest.approx(
        ref["temporal_noise"] / ref["temporal_signal"], rel=1e-12
    )


def test_temporal_estimates_are_unbiased_for_iid_gradients():
    """E[noise] = tr Σ and E[signal] = ‖μ‖² after only 4 steps (many independent tensors)."""
    g = torch.Generator().manual_seed(3)
    mu, sigma, runs = torch.tensor([0.5, -1.0, 2.0]), 0.8, 4000
    named = params_like(*[3] * runs)
    vgs = make(named, beta=0.7, statistic="temporal", rule="shrink")
    for _ in range(4):
        feed(vgs, named, [[mu + sigma * torch.randn(3, generator=g) for _ in range(runs)]])
    stats = vgs.statistics()
    noise = torch.tensor([stats[n].variance_unbiased * 3 for n, _ in named])
    signal = torch.tensor([stats[n].signal_unbiased * 3 for n, _ in named])
    se = lambda v: v.std() / runs**0.5  # noqa: E731
    assert abs(noise.mean() - 3 * sigma**2) < 4 * se(noise)
    assert abs(signal.mean() - mu.square().sum()) < 4 * se(signal)
    raw = torch.tensor([stats[n].signal * 3 for n, _ in named])
    assert raw.mean() - mu.square().sum() > 10 * se(raw)  # the raw squared mean is biased


def test_float32_long_run_stays_accurate():
    """10^4 steps of float32 gradients with a large mean: the fast path matches float64."""
    g = torch.Generator().manual_seed(4)
    named32, named64 = params_like(50, dtype=torch.float32), params_like(50)
    fast32 = make(named32, beta=0.999, statistic="temporal", rule="shrink")
    exact64 = make(named64, beta=0.999, foreach=False, statistic="temporal", rule="shrink")
    base = 100.0 + torch.randn(50, generator=g)
    for _ in range(3000):
        grad = base + 0.05 * torch.randn(50, generator=g)
        feed(fast32, named32, [[grad.float()]])
        feed(exact64, named64, [[grad.float().double()]])
    a, b = fast32.statistics()["p0"], exact64.statistics()["p0"]
    assert a.variance >= 0
    assert a.normalized_variance == pytest.approx(b.normalized_variance, rel=1e-3, abs=1e-6)
