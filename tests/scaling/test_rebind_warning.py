"""A model re-created without ``rebind()`` leaves the scaler without gradients: it says so once."""

import re
import warnings

import torch

from gradstats import VarianceGradientScaler
from gradstats.scaling._scaler import IDLE_STEPS

MATCH = r"20 consecutive step\(\) calls found no new gradient on the 2 tracked parameters.*rebind"


def _train(vgs, model, steps):
    x = torch.randn(8, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(steps):
            model.zero_grad()
            model(x).pow(2).mean().backward()
            vgs.step()
    return [w for w in record if "consecutive step()" in str(w.message)]


def test_the_patience_is_20_calls():
    assert IDLE_STEPS == 20


def test_a_recreated_model_warns_once_after_20_steps():
    torch.manual_seed(0)
    vgs = VarianceGradientScaler(
        torch.nn.Linear(3, 1).named_parameters(), statistic="temporal", rule="shrink"
    )
    fresh = torch.nn.Linear(3, 1)  # the user rebuilt the model and forgot rebind()
    assert not _train(vgs, fresh, IDLE_STEPS - 1)
    record = _train(vgs, fresh, 30)
    assert len(record) == 1
    assert re.search(MATCH, str(record[0].message))
    assert vgs.updates == 1  # only the first call read (and found no gradient)


def test_rebind_resets_and_a_healthy_loop_never_warns():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    vgs = VarianceGradientScaler(model.named_parameters(), statistic="temporal", rule="shrink")
    assert not _train(vgs, model, 3 * IDLE_STEPS)
    fresh = torch.nn.Linear(3, 1)
    vgs.rebind(fresh.named_parameters())
    assert not _train(vgs, fresh, 3 * IDLE_STEPS)
    assert vgs.updates == 6 * IDLE_STEPS


def test_the_original_order_never_warns():
    """scale_gradients() reads the new gradients; the step() after optimizer.step() finds none:
    one idle call per iteration is the original's order, not a lost model."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    vgs = VarianceGradientScaler(model.named_parameters(), statistic="temporal", rule="shrink")
    x = torch.randn(8, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3 * IDLE_STEPS):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            vgs.scale_gradients()
            opt.step()
            vgs.step()
    assert not [w for w in record if "consecutive step()" in str(w.message)]
