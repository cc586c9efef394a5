"""all_reduce() under two gloo ranks equals the single-process result."""

import torch

from gradstats.moments import RunningMoments
from gradstats.testing import run_gloo


def _data():
    g = torch.Generator().manual_seed(21)
    x = torch.randn(31, 4, 3, generator=g, dtype=torch.float64) * 5 + 2
    w = torch.rand(31, generator=g, dtype=torch.float64)
    return x, w


def _shard(rank):
    # uneven shards, several update calls per rank, one poisoned call on rank 1
    x, w = _data()
    rows = torch.arange(0, 12) if rank == 0 else torch.arange(12, 31)
    return x[rows], w[rows]


def _reduce_on_rank(rank, world_size, weights):
    x, w = _shard(rank)
    rm = RunningMoments((4, 3), weights=weights)
    for chunk in torch.arange(len(x)).split(5):
        rm.update(x[chunk], w[chunk])
    if rank == 1:
        rm.update(torch.full((2, 4, 3), float("nan"), dtype=torch.float64))
    rm.all_reduce()
    return {
        "mean": rm.mean,
        "var": rm.variance(),
        "se": rm.standard_error(),
        "count": rm.count,
        "skipped": rm.skipped,
    }


def test_all_reduce_over_two_gloo_ranks_equals_one_process():
    results = run_gloo(_reduce_on_rank, world_size=2, args=("reliability",))
    x, w = _data()
    single = RunningMoments((4, 3), weights="reliability").update(x, w)
    for result in results:
        torch.testing.assert_close(result["mean"], single.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result["var"], single.variance(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result["se"], single.standard_error(), rtol=1e-12, atol=1e-12)
        assert result["count"].item() == 31
        assert result["skipped"].item() == 1
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key])  # identical on every rank


def test_all_reduce_without_process_group_is_a_no_op():
    rm = RunningMoments().update(torch.tensor([1.0, 2.0, 4.0]))
    before = rm.state_dict()
    rm.all_reduce()
    assert torch.equal(rm.state_dict()["m2"], before["m2"])
