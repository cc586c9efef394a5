import io
import math

import pytest
import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError, StateError
from gradstats.moments import EMAMoments
from gradstats.testing import assert_state_equal, reference_ema


def _feed(ema, values):
    for value in values:
        ema.update(torch.as_tensor(value, dtype=torch.float64))
    return ema


def test_golden_one_to_four():
    ema = _feed(EMAMoments(beta=0.99, dtype=torch.float64), [1.0, 2.0, 3.0, 4.0])
    # golden values from spec/scaling.md §2; the last digits differ by rounding order only.
    torch.testing.assert_close(ema.mean.item(), 2.512562560288946, rtol=1e-14, atol=0)
    torch.testing.assert_close(ema.variance.item(), 1.2498926845788585, rtol=1e-14, atol=0)
    torch.testing.assert_close(ema.unbiased_variance.item(), 1.6665937190836144, rtol=1e-14, atol=0)
    torch.testing.assert_close(ema.reliability.item(), 0.2500315642218311, rtol=1e-14, atol=0)


def test_two_anticorrelated_coordinates_golden():
    ema = EMAMoments(beta=0.99, shape=2, dtype=torch.float64)
    ema.update(torch.tensor([0.0, 2.0])).update(torch.tensor([2.0, 0.0]))
    expected = torch.full((2,), 0.9999747481124215)
    torch.testing.assert_close(ema.variance, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_input_reads_exactly_its_value_every_step(dtype):
    value = torch.tensor([0.1, -3.7, 12345.678], dtype=dtype)
    ema = EMAMoments(beta=0.999, shape=3, dtype=dtype)
    for _ in range(200):
        ema.update(value)
        assert torch.equal(ema.mean, value)
        assert torch.equal(ema.variance, torch.zeros_like(value))


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("steps", [1, 2, 7, 60])
def test_matches_explicit_weights(beta, steps):
    g = torch.Generator().manual_seed(steps)
    xs = [torch.randn(4, 3, generator=g) * 2 + 5 for _ in range(steps)]
    ema = EMAMoments(beta=beta, shape=(4, 3), dtype=torch.float64)
    for x in xs:
        ema.update(x)
    ref = reference_ema(xs, beta)
    torch.testing.assert_close(ema.mean, ref["mean"])
    torch.testing.assert_close(ema.variance, ref["variance"])
    torch.testing.assert_close(ema.reliability, ref["reliability"])
    torch.testing.assert_close(ema.effective_sample_size, ref["effective_sample_size"])
    torch.testing.assert_close(ema.unbiased_variance, ref["unbiased_variance"], equal_nan=True)


def test_no_estimate_states():
    ema = EMAMoments(beta=0.9, dtype=torch.float64)
    assert torch.isnan(ema.mean)
    assert torch.isnan(ema.variance)
    assert ema.effective_sample_size.item() == 0
    ema.update(torch.tensor(5.0))
    assert ema.mean.item() == 5.0
    assert ema.variance.item() == 0.0
    assert ema.effective_sample_size.item() == pytest.approx(1.0, rel=1e-15)
    assert torch.isnan(ema.unbiased_variance)
    assert torch.isnan(ema.standard_error())
    ema.update(torch.tensor(7.0))
    assert torch.isfinite(ema.unbiased_variance)


def test_effective_sample_size_tends_to_stationary_value():
    ema = _feed(EMAMoments(beta=0.9, dtype=torch.float64), [float(i % 3) for i in range(500)])
    assert ema.effective_sample_size.item() == pytest.approx(1.9 / 0.1, rel=1e-12)


def test_unbiased_variance_is_unbiased_over_many_streams():
    """Each of 200,000 elements is an independent stream with variance 4; t = 5 steps."""
    g = torch.Generator().manual_seed(11)
    ema = EMAMoments(beta=0.7, shape=200_000, dtype=torch.float64)
    for _ in range(5):
        ema.update(3.0 + 2.0 * torch.randn(200_000, generator=g))
    estimates = ema.unbiased_variance
    standard_error = estimates.std() / math.sqrt(estimates.numel())
    assert abs(estimates.mean().item() - 4.0) < 4 * standard_error.item()
    biased = ema.variance.mean().item()
    assert abs(biased - 4.0) > 20 * standard_error.item()  # the correction matters


def test_skipped_and_non_finite_updates_change_nothing():
    ema = _feed(EMAMoments(beta=0.9, shape=(), dtype=torch.float64), [1.0, 4.0])
    before = ema.state_dict()
    ema.update(torch.tensor(100.0), skip=True)
    ema.update(torch.tensor(100.0), skip=torch.tensor(True))
    ema.update(torch.tensor(float("nan")))
    ema.update(torch.tensor(float("-inf")))
    assert_state_equal(ema.state_dict(), {**before, "skipped": torch.tensor(4)})
    assert ema.skipped.item() == 4
    ema.update(torch.tensor(2.0), skip=torch.tensor(False))
    assert ema.count.item() == 3
    torch.testing.assert_close(ema.mean, reference_ema([1.0, 4.0, 2.0], 0.9)["mean"])


def test_float32_stream_with_large_offset_keeps_accurate_variance():
    g = torch.Generator().manual_seed(5)
    xs = [1e4 + 1e-2 * torch.randn(1000, generator=g) for _ in range(300)]
    ema = EMAMoments(beta=0.99, shape=1000, dtype=torch.float32)
    for x in xs:
        ema.update(x.float())
    ref = reference_ema([x.float().double() for x in xs], 0.99)["variance"]
    got = ema.variance.double()
    assert (got >= 0).all()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=0)  # float32 state, 300 steps


def test_state_dict_round_trip_then_continue_is_bitwise():
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(3, generator=g) for _ in range(12)]
    straight = EMAMoments(beta=0.95, shape=3)
    for x in xs:
        straight.update(x)
    first = EMAMoments(beta=0.95, shape=3)
    for x in xs[:5]:
        first.update(x)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = EMAMoments(beta=0.95, shape=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for x in xs[5:]:
        resumed.update(x)
    assert torch.equal(resumed.mean, straight.mean)
    assert torch.equal(resumed.variance, straight.variance)
    assert torch.equal(resumed.count, straight.count)


def test_loaded_state_dict_is_not_mutated_by_later_updates():
    source = EMAMoments(beta=0.9, shape=2).update(torch.ones(2)).state_dict()
    snapshot = {k: v.clone() for k, v in source.items() if isinstance(v, torch.Tensor)}
    ema = EMAMoments(beta=0.9, shape=2)
    ema.load_state_dict(source)
    ema.update(torch.tensor([3.0, -1.0]))
    for key, value in snapshot.items():
        assert torch.equal(source[key], value)


@pytest.mark.parametrize(
    ("source", "match"),
    [
        (lambda: EMAMoments(beta=0.8, shape=2).state_dict(), "beta"),
        (lambda: EMAMoments(beta=0.9, shape=3).state_dict(), "shape"),
        (lambda: {**EMAMoments(beta=0.9, shape=2).state_dict(), "version": 99}, "version"),
    ],
    ids=["beta", "shape", "version"],
)
def test_load_state_dict_rejects_mismatches(source, match):
    ema = EMAMoments(beta=0.9, shape=2).update(torch.ones(2))
    before = ema.state_dict()
    with pytest.raises(StateError, match=match):
        ema.load_state_dict(source())
    assert_state_equal(ema.state_dict(), before)


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_beta_outside_open_unit_interval_is_rejected(beta):
    with pytest.raises(ConfigurationError, match=r"beta must lie in the open interval \(0, 1\)"):
        EMAMoments(beta=beta)


def test_beta_of_wrong_type_is_rejected():
    with pytest.raises(ConfigurationTypeError, match="beta"):
        EMAMoments(beta="0.9")


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.ones(3), ConfigurationError, r"x must have shape shape = \(2,\)"),
        (torch.ones(2, dtype=torch.int64), ConfigurationTypeError, "x must have a real floating"),
        (torch.ones(2, 1), ConfigurationError, "x must have shape"),
        ([1.0, 2.0], ConfigurationTypeError, "x must be a torch.Tensor"),
    ],
)
def test_update_bad_input(x, error, match):
    ema = EMAMoments(shape=2).update(torch.ones(2))
    before = ema.state_dict()
    with pytest.raises(error, match=match):
        ema.update(x)
    assert_state_equal(ema.state_dict(), before)


@pytest.mark.parametrize("skip", [torch.tensor(1.0), torch.tensor([True]), 1, "yes"])
def test_skip_must_be_boolean(skip):
    ema = EMAMoments().update(torch.tensor(2.0))
    before = ema.state_dict()
    with pytest.raises(ConfigurationTypeError, match="skip must be a bool"):
        ema.update(torch.tensor(1.0), skip=skip)
    assert_state_equal(ema.state_dict(), before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dtype": torch.int64}, ConfigurationTypeError, "dtype must be a floating"),
        ({"shape": (-1,)}, ConfigurationError, "shape"),
        ({"nonfinite": "warn"}, ConfigurationError, "nonfinite must be one of 'skip', 'raise'"),
        ({"device": "nowhere"}, ConfigurationError, "device 'nowhere' is not usable"),
    ],
)
def test_constructor_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        EMAMoments(**kwargs)


def test_low_precision_observations_are_upcast():
    ema = EMAMoments(beta=0.9, shape=2, dtype=torch.float32)
    ema.update(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    ema.update(torch.tensor([3.0, 6.0], dtype=torch.float16))
    assert ema.mean.dtype == torch.float32
    expected = reference_ema([[1.0, 2.0], [3.0, 6.0]], 0.9)["variance"].float()
    torch.testing.assert_close(ema.variance, expected)


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99, 0.999, 0.9999])
def test_host_step_sizes_have_the_bits_of_the_tensor_ones(beta):
    """ema_step_sizes (Python floats, for CPU state) against ema_step_size element by element,
    over counts 0..5000 in vectors of every length to 40 (torch's pow and its scalar tail)."""
    from gradstats.moments import ema_step_size, ema_step_sizes

    g = torch.Generator().manual_seed(int(beta * 1e4))
    for length in range(1, 41):
        count = torch.randint(0, 5001, (length,), generator=g)
        expected = ema_step_size(beta, count).tolist()
        assert ema_step_sizes(beta, count) == expected
    first = ema_step_sizes(beta, torch.tensor([0, 1, 2]))
    assert first[:2] == [1.0, 1.0]
    assert first[2] == pytest.approx(1.0 / (1.0 + beta), rel=1e-15)
