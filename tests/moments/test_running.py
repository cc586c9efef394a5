import io

import pytest
import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError, StateError
from gradstats.moments import RunningMoments
from gradstats.testing import assert_state_equal, reference_moments, welford_loop


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("first", "second"), [([1.0, 2.0], [3.0, 4.0]), ([3.0, 4.0], [1.0, 2.0])])
def test_chan_merge_golden_in_either_order(first, second):
    merged = RunningMoments().update(torch.tensor(first))
    merged.merge(RunningMoments().update(torch.tensor(second)))
    assert merged.count.item() == 4
    assert merged.mean.item() == 2.5
    assert merged.m2.item() == 5.0


@pytest.mark.parametrize("weights", ["frequency", "reliability"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference_in_batches(weights, weighted):
    g = _gen(1)
    x = torch.randn(37, 3, 2, generator=g) * 3 + 1
    w = torch.rand(37, generator=g) * 2 if weighted else None
    rm = RunningMoments((3, 2), weights=weights)
    for rows in torch.arange(37).split([5, 1, 13, 0, 18]):
        rm.update(x[rows], None if w is None else w[rows])
    ref = reference_moments(x, w, weights=weights)
    torch.testing.assert_close(rm.mean, ref["mean"])
    torch.testing.assert_close(rm.variance(unbiased=False), ref["population_variance"])
    torch.testing.assert_close(rm.variance(unbiased=True), ref["unbiased_variance"])
    torch.testing.assert_close(rm.effective_sample_size, ref["effective_sample_size"])
    torch.testing.assert_close(rm.standard_error(), ref["standard_error"])


def test_matches_classic_welford_loop():
    x = torch.randn(50, 4, generator=_gen(2))
    rm = RunningMoments(4).update(x[:20]).update(x[20:])
    ref = welford_loop(x)
    torch.testing.assert_close(rm.mean, ref["mean"])
    torch.testing.assert_close(rm.m2, ref["m2"])


def test_unweighted_frequency_and_reliability_agree():
    x = torch.randn(9, 3, generator=_gen(3))
    freq = RunningMoments(3, weights="frequency").update(x)
    rel = RunningMoments(3, weights="reliability").update(x)
    torch.testing.assert_close(freq.variance(), rel.variance())
    torch.testing.assert_close(freq.effective_sample_size, rel.effective_sample_size)


def test_frequency_weights_equal_repeated_rows():
    x = torch.tensor([1.0, 5.0, 2.0])
    weighted = RunningMoments().update(x, torch.tensor([2.0, 1.0, 3.0]))
    repeated = RunningMoments().update(torch.tensor([1.0, 1.0, 5.0, 2.0, 2.0, 2.0]))
    torch.testing.assert_close(weighted.mean, repeated.mean)
    torch.testing.assert_close(weighted.variance(), repeated.variance())
    torch.testing.assert_close(weighted.standard_error(), repeated.standard_error())


def test_no_estimate_is_nan_not_a_division_by_zero():
    rm = RunningMoments()
    assert torch.isnan(rm.mean)
    assert torch.isnan(rm.variance(unbiased=False))
    rm.update(torch.tensor([3.0]))
    assert rm.mean.item() == 3.0
    assert rm.variance(unbiased=False).item() == 0.0
    assert torch.isnan(rm.variance())
    assert torch.isnan(rm.standard_error())


def test_reliability_weights_with_one_effective_sample_have_no_variance():
    rel = RunningMoments(weights="reliability").update(
        torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    )
    assert rel.effective_sample_size.item() == 1.0
    assert torch.isnan(rel.variance())


def test_non_finite_update_is_skipped_whole_and_counted():
    rm = RunningMoments(2).update(torch.tensor([[1.0, 2.0], [3.0, 5.0]]))
    before = rm.state_dict()
    rm.update(torch.tensor([[1.0, float("nan")], [0.0, 0.0]]))
    rm.update(torch.tensor([[float("inf"), 1.0]]))
    assert_state_equal(rm.state_dict(), {**before, "skipped": torch.tensor(2)})
    assert rm.skipped.item() == 2


def test_empty_batch_changes_nothing():
    rm = RunningMoments(3).update(torch.ones(2, 3))
    rm.update(torch.empty(0, 3))
    assert rm.count.item() == 2


def test_float32_stream_with_large_offset_keeps_accurate_variance():
    g = _gen(4)
    chunks = [1e4 + 1e-2 * torch.randn(1000, generator=g) for _ in range(50)]
    rm = RunningMoments(dtype=torch.float32)
    naive_sum = naive_sq = torch.zeros((), dtype=torch.float32)
    for chunk in chunks:
        rm.update(chunk.float())
        naive_sum = naive_sum + chunk.float().sum()
        naive_sq = naive_sq + chunk.float().square().sum()
    exact = torch.cat([c.float().double() for c in chunks]).var()  # same float32 values, float64
    got = rm.variance()
    assert got.item() >= 0
    # float32 state, shifted (moments/_shift.py): the data's quantisation to ulp(1e4) ~ 1e-3 =
    # 0.1 noise std is in both; the state itself adds only float32 rounding of the spread
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=0)
    n = 50 * 1000
    naive = (naive_sq - naive_sum**2 / n) / (n - 1)
    assert abs(naive.double().item() - exact.item()) > 10 * exact.item()  # what we avoid


def test_state_dict_round_trip_through_weights_only_load():
    rm = RunningMoments((2,), weights="reliability").update(torch.randn(5, 2), torch.rand(5))
    buffer = io.BytesIO()
    torch.save(rm.state_dict(), buffer)
    buffer.seek(0)
    loaded = RunningMoments((2,), weights="reliability")
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert_state_equal(loaded.state_dict(), rm.state_dict())


def _broken_m2():
    state = RunningMoments(3).state_dict()
    state["m2"] = torch.zeros(5)
    return state


@pytest.mark.parametrize(
    ("source", "match"),
    [
        (lambda: RunningMoments(4).state_dict(), "shape"),
        (lambda: RunningMoments(3, weights="reliability").state_dict(), "weights"),
        (lambda: {"format": "something else"}, "format"),
        (_broken_m2, "m2"),
    ],
    ids=["shape", "weights", "format", "m2-shape"],
)
def test_load_state_dict_rejects_mismatch_without_half_updating(source, match):
    target = RunningMoments(3).update(torch.ones(2, 3))
    before = target.state_dict()
    with pytest.raises(StateError, match=match):
        target.load_state_dict(source())
    assert_state_equal(target.state_dict(), before)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.ones(4, 2),), ConfigurationError, "x must have shape"),
        ((torch.ones(4),), ConfigurationError, "x must have shape"),
        ((torch.ones(4, 3, dtype=torch.int64),), ConfigurationTypeError, "x must have a real"),
        (([1.0, 2.0],), ConfigurationTypeError, "x must be a torch.Tensor"),
        ((torch.ones(4, 3), torch.ones(3)), ConfigurationError, "weight must have shape"),
        ((torch.ones(2, 3), torch.tensor([1.0, -1.0])), ConfigurationError, "non-negative"),
        ((torch.ones(2, 3), torch.tensor([1.0, float("nan")])), ConfigurationError, "finite"),
    ],
)
def test_update_bad_input(args, error, match):
    rm = RunningMoments(3).update(torch.ones(2, 3))
    before = rm.state_dict()
    with pytest.raises(error, match=match):
        rm.update(*args)
    assert_state_equal(rm.state_dict(), before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"weights": "analytic"},
            ConfigurationError,
            "weights must be one of 'frequency', 'reliability'",
        ),
        ({"shape": (2, -1)}, ConfigurationError, "shape"),
        ({"shape": "3"}, ConfigurationTypeError, "shape"),
        ({"dtype": torch.int32}, ConfigurationTypeError, "dtype"),
        ({"nonfinite": "ignore"}, ConfigurationError, "nonfinite must be one of 'skip', 'raise'"),
        ({"device": "no-such-device"}, ConfigurationError, "device 'no-such-device'"),
        ({"device": 3.5}, ConfigurationTypeError, "device must be a torch.device"),
    ],
)
def test_constructor_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        RunningMoments(**kwargs)


@pytest.mark.parametrize(
    ("other", "error", "match"),
    [
        (lambda: torch.ones(3), ConfigurationTypeError, "other must be a RunningMoments"),
        (lambda: RunningMoments(4), ConfigurationError, "other has shape"),
        (
            lambda: RunningMoments(3, weights="reliability"),
            ConfigurationError,
            "other uses weights",
        ),
    ],
    ids=["not-moments", "shape", "weights"],
)
def test_merge_rejects_incompatible_objects(other, error, match):
    rm = RunningMoments(3).update(torch.ones(2, 3))
    before = rm.state_dict()
    with pytest.raises(error, match=match):
        rm.merge(other())
    assert_state_equal(rm.state_dict(), before)


def test_merge_converts_dtype_and_leaves_other_unchanged():
    a = RunningMoments(dtype=torch.float64).update(torch.tensor([1.0, 2.0]))
    b = RunningMoments(dtype=torch.float32).update(torch.tensor([3.0, 4.0], dtype=torch.float32))
    a.merge(b)
    assert a.mean.dtype == torch.float64
    assert a.mean.item() == 2.5
    assert b.count.item() == 2


def test_pinned_device_rejects_data_elsewhere():
    rm = RunningMoments(device="meta")
    with pytest.raises(ConfigurationError, match="x is on cpu but the state lives on meta"):
        rm.update(torch.ones(2))


def test_unpinned_state_follows_first_data():
    rm = RunningMoments()
    rm.update(torch.ones(2, device="meta"))
    assert rm.device == torch.device("meta")
    assert rm.count.device == torch.device("meta")


def test_mask_equals_updating_with_the_selected_rows():
    """mask= is x[mask] without the indexing sync: same counts, mean, M2; other rows ignored."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(40, generator=g) > 0.4
    x_bad = torch.where(mask[:, None], x, torch.nan)  # unselected rows may hold anything
    masked = RunningMoments(3).update(x[:10]).update(x_bad, mask=mask)
    selected = RunningMoments(3).update(x[:10]).update(x[mask])
    assert masked.count == selected.count
    torch.testing.assert_close(masked.mean, selected.mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(masked.variance(), selected.variance(), rtol=1e-13, atol=0)
    assert masked.skipped == 0
    weights = torch.rand(40, generator=g, dtype=torch.float64)
    both = RunningMoments(3, weights="reliability").update(x, weights, mask=mask)
    ref = RunningMoments(3, weights="reliability").update(x[mask], weights[mask])
    torch.testing.assert_close(both.mean, ref.mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(both.variance(), ref.variance(), rtol=1e-13, atol=0)


def test_accept_false_rejects_the_batch_without_a_host_read():
    x = torch.randn(8, 2, dtype=torch.float64)
    stats = RunningMoments(2).update(x[:4])
    before = (stats.count, stats.mean.clone())
    stats.update(x[4:], accept=torch.tensor(False))
    assert (stats.count, stats.skipped) == (before[0], 1)
    torch.testing.assert_close(stats.mean, before[1], rtol=0, atol=0)
    stats.update(x[4:], accept=torch.tensor(True))
    torch.testing.assert_close(stats.mean, x.mean(0), rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mask": torch.ones(3, dtype=torch.bool)}, ConfigurationError, "mask must have shape"),
        ({"mask": torch.ones(4)}, ConfigurationTypeError, "mask must be a bool tensor"),
        ({"mask": [True] * 4}, ConfigurationTypeError, "mask must be a tensor"),
        ({"accept": torch.tensor([True])}, ConfigurationTypeError, "accept must be a bool scalar"),
        ({"accept": True}, ConfigurationTypeError, "accept must be a bool scalar tensor; got bool"),
    ],
)
def test_bad_mask_or_accept(kwargs, error, match):
    rm = RunningMoments(2).update(torch.ones(3, 2))
    before = rm.state_dict()
    with pytest.raises(error, match=match):
        rm.update(torch.zeros(4, 2), **kwargs)
    assert_state_equal(rm.state_dict(), before)
