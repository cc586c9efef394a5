"""Right in float32 at any magnitude: large offsets, tiny and huge scales, scale-safe norms.

Every case is checked against a float64 brute force from the stored gradient history
(:func:`gradstats.testing.reference_scaler_statistics`), for the fast and the reference path.
"""

import pytest
import torch

from gradstats.scaling._kernels import power_of_two_scale, squared_norms
from gradstats.testing import reference_scaler_statistics, reference_two_batch

from ._helpers import assert_same, feed, make, params_like

N, STEPS, BETA = 400, 20, 0.9


def _history(offset, noise, scale=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = offset + noise * torch.randn(STEPS, N, generator=g, dtype=torch.float64)
    return [(row * scale).to(dtype) for row in base]


def _run(history, foreach, dtype=torch.float32, **kwargs):
    named = params_like(N, dtype=dtype)
    vgs = make(
        named, beta=BETA, foreach=foreach, **{"statistic": "temporal", "rule": "shrink", **kwargs}
    )
    return feed(vgs, named, [[h] for h in history])


# float32 storage of m bounds the accuracy: ~ulp(offset)² / noise² relative (8.6e-5 at 1e4)
TOLERANCE = {1e2: 1e-5, 1e3: 1e-5, 1e4: 2e-4}


@pytest.mark.parametrize("foreach", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
def test_float32_noise_at_a_large_offset_matches_a_float64_brute_force(offset, foreach):
    history = _history(offset, 0.1)
    row = _run(history, foreach).statistics()["p0"]
    truth = reference_scaler_statistics([h.double() for h in history], BETA)
    assert row.variance_unbiased * N == pytest.approx(
        truth["temporal_noise"], rel=TOLERANCE[offset], abs=0
    )


@pytest.mark.parametrize("foreach", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
def test_float32_signal_at_a_large_offset_matches_a_float64_brute_force(offset, foreach):
    history = _history(offset, 0.1)
    row = _run(history, foreach).statistics()["p0"]
    truth = reference_scaler_statistics([h.double() for h in history], BETA)
    assert row.signal_unbiased * N == pytest.approx(truth["temporal_signal"], rel=1e-6, abs=0)


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
def test_fast_path_equals_the_reference_path_in_float32(offset):
    history = _history(offset, 0.1)
    fast = _run(history, True).statistics()["p0"]
    ref = _run(history, False).statistics()["p0"]
    assert fast.variance_unbiased == pytest.approx(ref.variance_unbiased, rel=1e-5, abs=0)
    assert fast.signal_unbiased == pytest.approx(ref.signal_unbiased, rel=1e-7, abs=0)
    assert fast.count == ref.count == STEPS


@pytest.mark.parametrize("foreach", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("scale", [1e-24, 1e-12, 1e12, 1.3e19])
def test_float32_factor_is_the_same_at_any_gradient_scale(scale, foreach):
    unit = _run(_history(1.0, 0.5), foreach, max_nonfinite_steps=10)
    scaled = _run(_history(1.0, 0.5, scale=scale), foreach, max_nonfinite_steps=10)
    stats = scaled.statistics()
    assert stats["global"].skipped == 0  # finite gradients are never taken for non-finite ones
    assert stats["global"].factor == pytest.approx(unit.get_scaling_factor(), rel=1e-5)
    assert 0.5 < stats["global"].factor < 0.95
    truth = reference_scaler_statistics([h.double() for h in _history(1.0, 0.5, scale)], BETA)
    assert stats["p0"].variance_unbiased * N == pytest.approx(
        truth["temporal_noise"], rel=1e-5, abs=0
    )


@pytest.mark.parametrize("scale", [1e-24, 1.3e19])
def test_same_point_is_right_at_any_gradient_scale(scale):
    named = params_like(N, dtype=torch.float32)
    vgs = make(named, statistic="same_point", beta=BETA, rule="shrink")
    micro = _history(1.0, 0.5, scale=scale)[:4]
    for g in micro:  # contributions h_k = g_k / K that sum to .grad, as backward leaves them
        vgs.observe([g / len(micro)])
    named[0][1].grad = torch.stack(micro).mean(0)
    vgs.step()
    row = vgs.statistics()["p0"]
    truth = reference_two_batch([m.double() for m in micro])
    assert row.variance_unbiased * N == pytest.approx(truth["noise"], rel=1e-5, abs=0)
    assert row.signal_unbiased * N == pytest.approx(truth["signal"], rel=1e-5, abs=0)


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (1.3e19, torch.float32),
        (3e38, torch.float32),
        (1e-24, torch.float32),
        (1e-44, torch.float32),
        (6e4, torch.float16),
        (1e-7, torch.float16),
        (1e38, torch.bfloat16),
        (1e-38, torch.bfloat16),
    ],
)
def test_squared_norms_neither_overflow_nor_underflow(value, dtype):
    tensors = [torch.full((1000,), value, dtype=dtype), torch.full((3, 2), -value, dtype=dtype)]
    expected = torch.stack([t.double().square().sum() for t in tensors])
    assert torch.all(expected > 0)
    assert torch.all(torch.isfinite(expected))
    assert torch.allclose(squared_norms(tensors), expected, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_squared_norms_flag_non_finite_tensors(bad):
    tensors = [torch.ones(4), torch.tensor([1.0, bad])]
    out = squared_norms(tensors)
    assert out[0] == 4.0
    assert not torch.isfinite(out[1])


def _finite(k):
    return [torch.tensor([1e3 + 0.1 * (k % 3), -1e3, 2e3 - 0.1 * k]), torch.ones(2) * k]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("foreach", [True, False], ids=["fast", "reference"])
def test_float32_non_finite_step_leaves_the_state_bitwise_unchanged(bad, foreach):
    named_a, named_b = (
        params_like(3, 2, dtype=torch.float32),
        params_like(3, 2, dtype=torch.float32),
    )
    clean = make(named_a, beta=0.9, foreach=foreach, statistic="temporal", rule="shrink")
    dirty = make(named_b, beta=0.9, foreach=foreach, statistic="temporal", rule="shrink")
    for k in range(5):
        feed(clean, named_a, [_finite(k)])
        feed(dirty, named_b, [_finite(k)])
        if k == 2:
            poisoned = _finite(k)
            poisoned[1][0] = bad
            feed(dirty, named_b, [poisoned])
    assert_same(clean.state_dict()["tensors"], dirty.state_dict()["tensors"])


@pytest.mark.parametrize("mean_square", [1e-80, 1e-48, 0.3, 1.0, 7.0, 1.7e38, 1e70])
def test_power_of_two_scale_brings_the_root_mean_square_to_order_one(mean_square):
    value = torch.tensor([mean_square], dtype=torch.float64)
    c = power_of_two_scale(value)
    mantissa, _ = torch.frexp(c)
    assert mantissa.item() == 0.5  # an exact power of two
    scaled = (c.square() * value).item()
    assert 0.25 <= scaled < 1.0 or c.item() in (2.0**-100, 2.0**100)


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_power_of_two_scale_is_one_without_a_magnitude(bad):
    assert power_of_two_scale(torch.tensor([bad], dtype=torch.float64)).item() == 1.0
