"""A float32 RunningMoments far from 0: the shifted state (moments/_shift.py) against float64.

Unshifted, 4,096 single-row updates of 1e5 ± 1 put the float32 variance 1% and the mean 0.1
standard deviations off (the mean's rounding to ulp(1e5) at every update); shifted, both are
within float32 rounding of the spread whatever the offset, the batch sizes, the merge order.
"""

import io
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from gradstats.errors import NonFiniteError
from gradstats.moments import RunningMoments
from gradstats.testing import run_gloo


def _stream(offset: float, rows: int, seed: int = 0, width: int = 6) -> torch.Tensor:
    """float32 data offset ± 1 (the reference sees the same float32 values in float64)."""
    g = torch.Generator().manual_seed(seed)
    return (offset + torch.randn(rows, width, generator=g, dtype=torch.float64)).float()


def _reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    wide = x.double()
    return wide.mean(0), wide.var(0)


def _assert_close_to_reference(rm: RunningMoments, x: torch.Tensor, var_rtol: float) -> None:
    mean, var = _reference(x)
    assert rm.mean.dtype == torch.float32
    torch.testing.assert_close(rm.variance().double(), var, rtol=var_rtol, atol=0)
    ulp = torch.finfo(torch.float32).eps * mean.abs()
    assert ((rm.mean.double() - mean).abs() <= ulp).all()  # the read-out's one rounding


@pytest.mark.parametrize("offset", [1e2, 1e4, 1e5, -3e6])
@pytest.mark.parametrize("batch", [1, 16, 256])
def test_float32_moments_at_large_offsets_match_float64(offset, batch):
    x = _stream(offset, 4096)
    rm = RunningMoments(6, dtype=torch.float32)
    for chunk in x.split(batch):
        rm.update(chunk)
    _assert_close_to_reference(rm, x, var_rtol=2e-5)
    exact = RunningMoments(6).update(x.double())
    torch.testing.assert_close(
        rm.standard_error().double(), exact.standard_error(), rtol=1e-5, atol=0
    )


def test_weighted_and_masked_float32_updates_match_float64():
    x = _stream(1e5, 600, seed=1)
    g = torch.Generator().manual_seed(2)
    w = torch.rand(600, generator=g, dtype=torch.float64)
    mask = torch.rand(600, generator=g) > 0.3
    mask[0] = False  # the first row of the first batch is not an observation: not the shift
    x[0] = float("nan")
    for weights in ("frequency", "reliability"):
        rm = RunningMoments(6, dtype=torch.float32, weights=weights)
        ref = RunningMoments(6, weights=weights)
        for rows in torch.arange(600).split(50):
            rm.update(x[rows], w[rows], mask=mask[rows])
            ref.update(torch.where(mask[rows, None], x[rows], 0.0).double(), w[rows] * mask[rows])
        torch.testing.assert_close(rm.variance().double(), ref.variance(), rtol=2e-5, atol=0)
        torch.testing.assert_close(rm.mean.double(), ref.mean, rtol=1e-7, atol=0)
        assert rm.count.item() == mask.sum().item()


@settings(max_examples=30, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 299), max_size=8, unique=True),
    order=st.permutations(range(9)),
    offset=st.sampled_from([1e3, 1e5, -1e6]),
)
def test_any_split_and_merge_order_at_an_offset_is_the_one_pass_result(cuts, order, offset):
    x = _stream(offset, 300, seed=3)
    bounds = [0, *sorted(cuts), 300]
    parts = [
        RunningMoments(6, dtype=torch.float32).update(x[a:b]) for a, b in itertools.pairwise(bounds)
    ]
    merged = RunningMoments(6, dtype=torch.float32)
    for k in order:
        if k < len(parts):
            merged.merge(parts[k])
    _assert_close_to_reference(merged, x, var_rtol=2e-5)


def test_merges_across_dtypes_and_frames_are_exact_to_float32():
    far, near = _stream(1e6, 200, seed=4), _stream(1e6 + 50.0, 300, seed=5)
    both = torch.cat([far, near])
    # float32 into float32 (different shifts), float32 into float64, float64 into float32
    a = RunningMoments(6, dtype=torch.float32).update(far)
    a.merge(RunningMoments(6, dtype=torch.float32).update(near))
    _assert_close_to_reference(a, both, var_rtol=2e-5)
    wide = RunningMoments(6).update(far.double())
    wide.merge(RunningMoments(6, dtype=torch.float32).update(near))
    mean, var = _reference(both)
    torch.testing.assert_close(wide.variance(), var, rtol=2e-6, atol=0)
    torch.testing.assert_close(wide.mean, mean, rtol=1e-12, atol=0)  # K + m: no float32 read
    narrow = RunningMoments(6, dtype=torch.float32).update(far)
    narrow.merge(RunningMoments(6).update(near.double()))
    _assert_close_to_reference(narrow, both, var_rtol=2e-5)
    empty = RunningMoments(6, dtype=torch.float32)  # an empty state takes the other's frame
    empty.merge(RunningMoments(6, dtype=torch.float32).update(far))
    _assert_close_to_reference(empty, far, var_rtol=2e-5)


def test_save_load_continue_equals_an_uninterrupted_float32_stream():
    x = _stream(1e5, 512, seed=6)
    whole = RunningMoments(6, dtype=torch.float32)
    for chunk in x.split(32):
        whole.update(chunk)
    first = RunningMoments(6, dtype=torch.float32)
    for chunk in x[:256].split(32):
        first.update(chunk)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) >= {"mean", "mean_residual"}
    assert state["mean"].dtype == torch.float32  # the mean itself, rounded: readable as before
    resumed = RunningMoments(6, dtype=torch.float32)
    resumed.load_state_dict(state)
    for chunk in x[256:].split(32):
        resumed.update(chunk)
    for key in ("mean", "m2", "count"):
        assert torch.equal(resumed.state_dict()[key], whole.state_dict()[key]), key
    assert torch.equal(resumed.variance(), whole.variance())


def test_a_dict_without_the_residual_and_a_float64_reader_load_the_mean():
    x = _stream(1e5, 100, seed=7)
    state = RunningMoments(6, dtype=torch.float32).update(x).state_dict()
    wide = RunningMoments(6)
    wide.load_state_dict(state)  # float64 adds the residual back: the mean to ~1e-12
    torch.testing.assert_close(wide.mean, x.double().mean(0), rtol=1e-12, atol=0)
    del state["mean_residual"]  # a dict written before the shift existed: K = its mean
    old = RunningMoments(6, dtype=torch.float32)
    old.load_state_dict(state)
    more = _stream(1e5, 100, seed=8)
    # the mean it saved was rounded to ulp(1e5)/2 (~0.4% of a standard deviation): the first
    # merge after it carries that into M2 once, as an unshifted float32 state did at every update
    _assert_close_to_reference(old.update(more), torch.cat([x, more]), var_rtol=1e-3)


def test_a_rejected_first_batch_changes_nothing_in_a_float32_state():
    rm = RunningMoments(3, dtype=torch.float32)
    fresh = rm.state_dict()
    bad = torch.tensor([[1e5, 2.0, float("nan")], [3.0, 4.0, 5.0]])
    rm.update(bad)
    after = rm.state_dict()
    assert after["skipped"].item() == 1
    for key in ("mean", "mean_residual", "m2", "count"):
        assert torch.equal(after[key], fresh[key]), key
    rm.update(torch.full((2, 3), 7e5), mask=torch.zeros(2, dtype=torch.bool))  # no observation
    masked = rm.state_dict()
    for key in ("mean", "mean_residual", "m2", "count"):
        assert torch.equal(masked[key], fresh[key]), key


def _reduce_far_on_rank(rank, world_size):
    x = _stream(1e5 + 1e3 * rank, 300 + 100 * rank, seed=10 + rank)
    rm = RunningMoments(6, dtype=torch.float32)
    for chunk in x.split(64):
        rm.update(chunk)
    rm.all_reduce()
    return {"mean": rm.mean, "var": rm.variance(), "count": rm.count}


def test_all_reduce_of_float32_ranks_with_their_own_shifts_is_exact():
    results = run_gloo(_reduce_far_on_rank, world_size=2)
    both = torch.cat([_stream(1e5, 300, seed=10), _stream(1e5 + 1e3, 400, seed=11)])
    mean, var = _reference(both)
    for result in results:
        torch.testing.assert_close(result["var"].double(), var, rtol=2e-5, atol=0)
        ulp = torch.finfo(torch.float32).eps * mean.abs()
        assert ((result["mean"].double() - mean).abs() <= ulp).all()
        assert result["count"].item() == 700
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key])  # identical on every rank


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_masked_weighted_float32_updates_read_nothing_back_and_run_on_meta():
    x, mask = _stream(1e5, 64, seed=12), torch.rand(64) > 0.5
    w = torch.rand(64, dtype=torch.float64)
    reads = {}
    for dtype in (torch.float32, torch.float64):
        rm = RunningMoments(6, dtype=dtype)
        with _HostReads() as counter:
            for _ in range(3):
                rm.update(x, mask=mask)
                rm.update(x, w, mask=mask)  # the documented weight check: one read per call
        reads[dtype] = counter.reads
    assert reads[torch.float32] == reads[torch.float64] == 3  # the shift adds none
    meta = RunningMoments(6, dtype=torch.float32, device="meta")
    meta.update(x.to("meta"), mask=mask.to("meta"))  # (a weight check reads values: not on meta)
    assert meta.mean.device.type == "meta"


def test_the_first_shift_is_an_observation_not_a_zero_weight_or_masked_row():
    x = _stream(1e5, 4096, seed=13, width=4)
    w = torch.ones(4096, dtype=torch.float64)
    x[0], w[0] = 1e9, 0.0  # a row of weight 0 may hold anything
    rm = RunningMoments(4, dtype=torch.float32).update(x, w)
    ref = RunningMoments(4).update(x.double(), w)
    torch.testing.assert_close(rm.variance().double(), ref.variance(), rtol=2e-5, atol=0)


def test_a_float64_mean_merged_or_loaded_into_a_float32_state_keeps_its_low_part():
    far, more = _stream(1e5, 300, seed=14), _stream(1e5, 2000, seed=15)
    wide = RunningMoments(6).update(far.double())
    merged = RunningMoments(6, dtype=torch.float32)
    merged.merge(wide)  # an empty float32 state takes the float64 mean's rounding as K
    loaded = RunningMoments(6, dtype=torch.float32)
    loaded.load_state_dict(wide.state_dict())
    for rm in (merged, loaded):
        for row in more.split(1):
            rm.update(row)
        _assert_close_to_reference(rm, torch.cat([far, more]), var_rtol=2e-5)


def test_float64_loads_are_unchanged_bit_for_bit_signed_zeros_included():
    state = RunningMoments(2).update(torch.tensor([[1.0, -1.0], [-1.0, 1.0]])).state_dict()
    state["mean"] = torch.tensor([-0.0, 0.0], dtype=torch.float64)
    rm = RunningMoments(2)
    rm.load_state_dict(state)
    assert torch.signbit(rm.state_dict()["mean"]).tolist() == [True, False]
    assert "mean_residual" not in rm.state_dict()


def test_an_empty_summary_merged_into_a_far_float16_state_changes_nothing():
    rm = RunningMoments(2, dtype=torch.float16).update(torch.tensor([[300.0, 1.0], [302.0, 2.0]]))
    before = rm.variance()
    rm.merge(RunningMoments(2, dtype=torch.float16))
    assert torch.equal(rm.variance(), before)
    assert torch.isfinite(rm.m2).all()


def test_rejections_of_a_non_empty_float32_state_change_nothing():
    rm = RunningMoments(3, dtype=torch.float32).update(_stream(1e5, 50, seed=16, width=3))
    before = rm.state_dict()
    rm.update(_stream(2e5, 10, seed=17, width=3), accept=torch.tensor(False))
    rm.update(torch.full((2, 3), float("inf")))
    strict = RunningMoments(3, dtype=torch.float32, nonfinite="raise")
    strict.load_state_dict(before)
    with pytest.raises(NonFiniteError):
        strict.update(torch.full((2, 3), float("nan")))
    for state in (rm.state_dict(), strict.state_dict()):
        for key in ("mean", "mean_residual", "m2", "count"):
            assert torch.equal(state[key], before[key]), key


def test_the_shift_follows_the_mean_so_the_low_part_stays_a_rounding_residual():
    x = torch.cat([_stream(1e5, 500, seed=18), _stream(3e5, 500, seed=19)])  # the mean moves
    rm = RunningMoments(6, dtype=torch.float32)
    for row in x.split(1):
        rm.update(row)
    shift, low = rm._shift, rm._state.mean
    assert (low.abs() <= torch.finfo(torch.float32).eps * shift.abs()).all()  # ≤ ulp(K)
    torch.testing.assert_close(
        shift.double() + low.double(),
        x.double().mean(0),
        rtol=1e-8,
        atol=0,  # ≪ float32 eps
    )
