"""all_reduce() over 2 gloo processes equals one process on all the data."""

from __future__ import annotations

import torch

from gradstats.fisher import FisherCollector
from gradstats.testing import run_gloo


def _data():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)
    ).double()
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (10,), generator=g)
    return model, x, y


def _summary(fc):
    return {
        "fisher": fc.fisher(),
        "se": fc.standard_error(),
        "mean": fc.mean_gradient(),
        "mask": fc.group_fisher("mask"),
        "mask_se": fc.group_standard_error("mask"),
        "counts": fc.counts,
    }


def _rank(rank, world_size):
    torch.set_default_dtype(torch.float64)
    model, x, y = _data()
    rows = slice(0, 3) if rank == 0 else slice(3, 10)  # uneven shards
    fc = FisherCollector(model, element_se=True).collect(x[rows], y[rows])
    return _summary(fc.all_reduce())


def test_all_reduce_equals_one_process():
    results = run_gloo(_rank, world_size=2)
    model, x, y = _data()
    expected = _summary(FisherCollector(model, element_se=True).collect(x, y))
    for result in results:
        assert result["counts"] == {**expected["counts"], "batches": 2}  # one batch per rank
        for key in ("fisher", "se", "mean", "mask", "mask_se"):
            for name, value in expected[key].items():
                torch.testing.assert_close(result[key][name], value, msg=f"{key} {name}")


def test_all_reduce_without_a_process_group_is_a_no_op():
    model, x, y = _data()
    fc = FisherCollector(model).collect(x, y)
    before = fc.fisher()
    for name, value in fc.all_reduce().fisher().items():
        torch.testing.assert_close(value, before[name])
