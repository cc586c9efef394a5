"""The default rule's factor is 1 whatever the statistics, so the scaler forms ρ and the
readouts when they are read, not at every update: every read equals the eager scaler's."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gradstats import VarianceGradientScaler
from gradstats.scaling import ScalerConfig, _readout, init, observe
from gradstats.scaling._engine import update_
from gradstats.scaling._rules import constant_factor


def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(
        dtype
    )


def _run(eager, monkeypatch, steps=12, dtype=torch.float64, **options):
    """(scaler, model) after ``steps`` per-sample steps; ``eager``: readouts every update."""
    if eager:
        monkeypatch.setattr(_readout, "constant_factor", lambda config: False)
    model = _mlp(dtype)
    vgs = VarianceGradientScaler(model.named_parameters(), model=model, batch_size=16, **options)
    for k in range(steps):
        g = torch.Generator().manual_seed(100 + k)
        x = torch.randn(16, 5, generator=g, dtype=torch.float64).to(dtype)
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), torch.sin(x.sum(1, keepdim=True))).backward()
        vgs.step()
    monkeypatch.undo()
    return vgs, model


def _same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif hasattr(a, "__dataclass_fields__"):
        for name in a.__dataclass_fields__:
            _same(getattr(a, name), getattr(b, name))
    else:
        assert a == b or (a != a and b != b)  # (NaN)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aggregate", ["global", "param_group", "tensor"])
def test_every_read_equals_the_eager_scalers(monkeypatch, aggregate, dtype):
    lazy, _ = _run(False, monkeypatch, aggregate=aggregate, dtype=dtype)
    eager, _ = _run(True, monkeypatch, aggregate=aggregate, dtype=dtype)
    assert lazy._stale
    assert not eager._stale
    _same(lazy.statistics(), eager.statistics())
    assert lazy.get_normalized_variance() == eager.get_normalized_variance()
    for field in ("readout", "overall", "factor", "factor_per_tensor", "progress", "updates"):
        _same(getattr(lazy.state, field), getattr(eager.state, field))
    saved_lazy, saved_eager = lazy.state_dict(), eager.state_dict()
    assert saved_lazy.keys() == saved_eager.keys()
    assert lazy.get_scaling_factor() == 1.0


def test_the_logger_sees_the_eager_numbers(monkeypatch):
    logs = {}
    for eager in (False, True):
        seen = []
        _run(eager, monkeypatch, logger=lambda m, step, out=seen: out.append(m), log_every=4)
        logs[eager] = seen
    assert logs[False] == logs[True]
    assert len(logs[False]) == 3


def test_reads_after_a_load_equal_the_eager_scalers(monkeypatch):
    saved = _run(False, monkeypatch)[0].state_dict()
    rows = []
    for eager in (False, True):
        if eager:
            monkeypatch.setattr(_readout, "constant_factor", lambda config: False)
        model = _mlp()
        fresh = VarianceGradientScaler(model.named_parameters(), model=model, batch_size=16)
        fresh.load_state_dict(saved)
        rows.append(fresh.statistics())
        monkeypatch.undo()
    _same(rows[0], rows[1])


def test_only_a_constant_rule_skips_the_readouts():
    assert constant_factor(ScalerConfig())
    assert not constant_factor(ScalerConfig(max_rate=0.1))
    assert not constant_factor(ScalerConfig(scale=2.0))
    assert not constant_factor(ScalerConfig(rule="shrink"))
    params = [torch.nn.Parameter(torch.ones(3))]
    config = ScalerConfig(statistic="temporal", rule="shrink")
    state = init(config, params)
    params[0].grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="always 1"):
        update_(state, observe(state), config, readout=False)


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_default_update_issues_far_fewer_ops(monkeypatch):
    counts = {}
    for eager in (False, True):
        vgs, model = _run(eager, monkeypatch, steps=4)
        if eager:
            monkeypatch.setattr(_readout, "constant_factor", lambda config: False)
        x = torch.randn(16, 5, dtype=torch.float64)
        model.zero_grad()
        model(x).sum().backward()
        with _Count() as counter:
            vgs.step()
        monkeypatch.undo()
        counts[eager] = counter.count
    assert counts[False] + 60 <= counts[True], counts
