"""The scaler's CPU shortcut for a finite, applied step (flags read on the host, unchanged
counters reused, cached ones) leaves the same state as the device-style path, bit for bit,
through NaN, inf, skipped and missing-gradient steps, with the lazy and the eager readout."""

import pytest
import torch

from gradstats.scaling import _engine

from ._helpers import assert_same, make, params_like
from .test_one_pass import SHAPES, _script


def _drive(rule: str) -> tuple[object, list[dict]]:
    named = params_like(*SHAPES, dtype=torch.float32)
    vgs = make(named, beta=0.8, statistic="temporal", rule=rule, max_nonfinite_steps=None)
    reads = []
    for grads, kwargs in _script(torch.float32):
        for (_, p), g in zip(named, grads, strict=True):
            p.grad = None if g is None else g.clone()
        vgs.update_statistics(**kwargs)
        reads.append(vgs.state_dict())
    return vgs, reads


@pytest.mark.parametrize("rule", ["adascale", "shrink"])  # lazy (constant factor) and eager
def test_host_flag_shortcut_equals_the_tensor_counters(rule, monkeypatch):
    fast, fast_reads = _drive(rule)
    monkeypatch.setattr(_engine, "_host_flags", lambda finite, apply: None)
    slow, slow_reads = _drive(rule)
    assert_same(fast_reads, slow_reads)
    assert repr(fast.statistics()) == repr(slow.statistics())  # NaN fields compare equal
    state = fast._state
    assert (int(state.nonfinite), int(state.skipped), int(state.consecutive)) == (2, 3, 0)
    assert float(state.progress) == float(slow._state.progress)


def test_host_flags_are_read_only_for_cpu_state():
    finite = torch.tensor(True)
    assert _engine._host_flags(finite, torch.tensor(False)) == (True, False)
    assert _engine._host_flags(finite.to("meta"), finite.to("meta")) is None


def _micro_batches(monkeypatch_host: bool, monkeypatch) -> dict:
    from gradstats.scaling import _same_point

    if monkeypatch_host:
        monkeypatch.setattr(_same_point, "on_host", lambda device, distributed, n: False)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    vgs = make(model.named_parameters(), beta=0.9, statistic="same_point", rule="shrink")
    g = torch.Generator().manual_seed(4)
    for step in range(12):
        model.zero_grad()
        for _ in range(3 if step != 5 else 1):  # step 5: one micro-batch, no estimate
            x = torch.randn(8, 5, generator=g) * (1e3 if step == 7 else 1.0)
            if step == 9:
                x[0, 0] = float("nan")
            (model(x).square().mean() / 3).backward()
        vgs.step()
    monkeypatch.undo()
    return vgs.state_dict()


def test_same_point_host_update_equals_its_tensor_update(monkeypatch):
    """statistic="same_point" on the CPU takes the host path; its state after micro-batch
    steps (one with a single micro-batch, one large, one NaN) is the tensor path's, bitwise."""
    assert_same(_micro_batches(False, monkeypatch), _micro_batches(True, monkeypatch))
