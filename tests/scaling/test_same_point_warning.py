"""``statistic="same_point"`` with one backward per step never has an estimate: it says so once."""

import re
import warnings

import torch

from gradstats import VarianceGradientScaler
from gradstats.scaling._same_point import STARVED_UPDATES

MATCH = r"no estimate for 20 updates: each step recorded 1 backward pass.*several micro-batches"


def _loop(updates, micro_batches):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    vgs = VarianceGradientScaler(model.named_parameters(), statistic="same_point", rule="shrink")
    x = torch.randn(8, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(updates):
            model.zero_grad()
            for part in x.chunk(micro_batches):
                (model(part).pow(2).mean() / micro_batches).backward()
            vgs.step()
    return vgs, [w for w in record if issubclass(w.category, RuntimeWarning)]


def test_the_patience_is_20_updates():
    assert STARVED_UPDATES == 20


def test_one_backward_per_step_warns_after_k_updates():
    _, record = _loop(STARVED_UPDATES, micro_batches=1)
    assert len(record) == 1
    assert re.search(MATCH, str(record[0].message))


def test_no_warning_before_k_updates():
    vgs, record = _loop(STARVED_UPDATES - 1, micro_batches=1)
    assert record == []
    assert vgs.statistics()["global"].no_estimate


def test_the_warning_is_given_once():
    _, record = _loop(3 * STARVED_UPDATES, micro_batches=1)
    assert len(record) == 1


def test_micro_batches_never_warn():
    vgs, record = _loop(2 * STARVED_UPDATES, micro_batches=2)
    assert record == []
    assert not vgs.statistics()["global"].no_estimate


def test_the_warning_names_the_remedy():
    _, record = _loop(STARVED_UPDATES, micro_batches=1)
    message = str(record[0].message)
    assert "gradient accumulation" in message
    assert "statistic='temporal'" in message
