"""``statistic="per_sample"``: golden values, bad input, hooks, micro-batches, checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstats import VarianceGradientScaler
from gradstats.errors import ConfigurationError
from tests.scaling._helpers import assert_same


def _scaler(model, **kwargs):
    kwargs.setdefault("confidence", None)
    kwargs.setdefault("rule", "shrink")
    return VarianceGradientScaler(
        model.named_parameters(), statistic="per_sample", model=model, **kwargs
    )


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _train(model, vgs, steps, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for k in range(steps):
        x, y = _batch(seed + k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        vgs.step()
        opt.step()


def test_golden_one_coordinate():
    """B = 4, g = 1, 2, 3, 6: tr Σ = 14/3, ‖G‖² = 47/6, B_noise = 28/47 (spec §6)."""
    model = nn.Linear(1, 1, bias=False).double()
    vgs = _scaler(model, batch_size=4)
    x = torch.tensor([[1.0], [2.0], [3.0], [6.0]], dtype=torch.float64)
    model(x).mean().backward()  # l_i = w·x_i: g_i = x_i
    vgs.step()
    row = vgs.statistics()["global"]
    torch.testing.assert_close(row.variance, 14 / 3 / 4)  # tr Cov(ĝ) = tr Σ / B
    torch.testing.assert_close(row.signal, 47 / 6)
    torch.testing.assert_close(row.B_noise, 28 / 47)


def test_needs_a_model():
    model = _mlp()
    with pytest.raises(ConfigurationError, match="model="):
        VarianceGradientScaler(model.named_parameters(), statistic="per_sample", rule="shrink")
    with pytest.raises(ConfigurationError, match="per_sample"):
        VarianceGradientScaler(
            model.named_parameters(), model=model, statistic="temporal", rule="shrink"
        )
    with pytest.raises(ConfigurationError, match="unit"):
        VarianceGradientScaler(
            model.named_parameters(), unit="token", statistic="temporal", rule="shrink"
        )
    with pytest.raises(ConfigurationError, match="unit"):
        _scaler(model, unit="word")


def test_unsupported_modules_are_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    with pytest.raises(ConfigurationError, match=r"'1' \(BatchNorm1d"):
        _scaler(model)
    cnn = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Conv1d(3, 1, 2))
    with pytest.raises(ConfigurationError, match=r"'0' \(Conv1d: no token positions\), '1'"):
        _scaler(cnn, unit="token")


def test_tensors_of_another_model_are_refused():
    with pytest.raises(ConfigurationError, match="not parameters of the model"):
        VarianceGradientScaler(
            _mlp().named_parameters(), statistic="per_sample", model=_mlp(1), rule="shrink"
        )


def test_batch_of_one_gives_no_estimate():
    model = _mlp()
    vgs = _scaler(model)
    x, y = _batch(0, n=1)
    F.cross_entropy(model(x), y).backward()
    vgs.step()
    assert math.isnan(vgs.get_normalized_variance())
    assert vgs.get_scaling_factor() == 1.0


def _estimates(vgs):
    row = vgs.statistics()["global"]
    return row.variance, row.signal


def test_micro_batches_are_one_step_of_all_units():
    model = _mlp()
    x, y = _batch(3, n=8)
    whole = _scaler(model)
    F.cross_entropy(model(x), y).backward()
    whole.step()
    whole.remove_hooks()
    model.zero_grad()
    split = _scaler(model)
    for rows in (slice(0, 4), slice(4, 8)):
        (F.cross_entropy(model(x[rows]), y[rows]) / 2).backward()
    split.step()
    torch.testing.assert_close(_estimates(split), _estimates(whole))


def test_autograd_grad_and_paused_backward_are_not_recorded():
    model = _mlp()
    x, y = _batch(4)
    reference = _scaler(model)
    F.cross_entropy(model(x), y).backward()
    reference.step()
    reference.remove_hooks()
    model.zero_grad()
    vgs = _scaler(model)
    loss = F.cross_entropy(model(x), y)
    torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)  # a probe
    with vgs.paused():
        F.cross_entropy(model(x[:3]), y[:3]).backward()
    model.zero_grad()
    loss.backward()
    vgs.step()
    torch.testing.assert_close(_estimates(vgs), _estimates(reference))


class _NoPlans(dict):
    """A plan cache that keeps nothing: every commit is planned afresh."""

    def __setitem__(self, key, value) -> None:
        pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_planned_commits_equal_fresh_ones_when_the_reached_tensors_change(dtype):
    """The end of a backward reuses its plan (which staged entries go to which rows) while
    the same tensors reach .grad; a probe by ``torch.autograd.grad`` (nothing reaches .grad)
    or a layer frozen for some steps changes the plan."""
    runs = []
    for planned in (True, False):
        model = _mlp().to(dtype)
        vgs = _scaler(model, beta=0.9)
        if not planned:
            vgs._tracker.modules._plans = _NoPlans()
        for k, (frozen, probe) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (0, 1)]):
            model[0].weight.requires_grad_(not frozen)
            model.zero_grad()
            x, y = _batch(10 + k)
            x = x.to(dtype)
            if probe:
                wanted = [p for p in model.parameters() if p.requires_grad]
                torch.autograd.grad(F.cross_entropy(model(x[:5]), y[:5]), wanted)
            F.cross_entropy(model(x), y).backward()
            vgs.step()
        runs.append(vgs.state_dict())
    assert_same(runs[0], runs[1])


def test_remove_hooks_stops_recording():
    model = _mlp()
    vgs = _scaler(model)
    vgs.remove_hooks()
    x, y = _batch(5)
    F.cross_entropy(model(x), y).backward()
    vgs.update_statistics()
    assert math.isnan(vgs.get_normalized_variance())


def test_checkpoint_round_trip_is_bitwise():
    model = _mlp()
    twin = copy.deepcopy(model)
    straight = _scaler(model, beta=0.9)
    _train(model, straight, 5)
    first = _scaler(twin, beta=0.9)
    _train(twin, first, 3)
    state = first.state_dict()
    first.remove_hooks()
    resumed = _scaler(twin, beta=0.9)
    resumed.load_state_dict(state)
    _train(twin, resumed, 2, seed=3)
    assert_same(resumed.state_dict(), straight.state_dict())


def test_rebind_to_a_recreated_model():
    model = _mlp()
    vgs = _scaler(model, beta=0.9)
    _train(model, vgs, 2)
    before = vgs.statistics()["global"].count
    fresh = copy.deepcopy(model)
    vgs.rebind(fresh.named_parameters(), model=fresh)
    _train(fresh, vgs, 1, seed=2)
    assert vgs.statistics()["global"].count == before + 1
