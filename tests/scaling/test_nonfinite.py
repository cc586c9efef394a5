"""Non-finite gradients are skipped on the device, counted, never poison state; too many raise."""

import pytest
import torch

from ._helpers import feed, make, params_like


def _finite(k):
    return [
        torch.full((3,), float(k)) + torch.tensor([0.0, 1.0, -1.0]) * (k % 3),
        torch.ones(2) * k,
    ]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_step_changes_nothing_and_is_counted(bad):
    named_a, named_b = params_like(3, 2), params_like(3, 2)
    clean = make(named_a, beta=0.9)
    dirty = make(named_b, beta=0.9)
    for k in range(6):
        feed(clean, named_a, [_finite(k)])
        feed(dirty, named_b, [_finite(k)])
        if k == 3:
            poisoned = _finite(k)
            poisoned[0][1] = bad
            feed(dirty, named_b, [poisoned])
    a, b = clean.state_dict(), dirty.state_dict()
    for name in ("p0", "p1"):
        for key in ("count", "mean", "sq_ema"):
            assert torch.equal(a["tensors"][name][key], b["tensors"][name][key])
    stats = dirty.statistics()["global"]
    assert stats.nonfinite_steps == 1
    assert stats.skipped_steps == 1
    assert clean.get_scaling_factor() == dirty.get_scaling_factor()


def test_user_skip_flag_skips_the_update():
    named = params_like(3, 2)
    vgs = make(named, beta=0.9)
    feed(vgs, named, [_finite(1), _finite(2)])
    before = vgs.state_dict()
    feed(vgs, named, [_finite(5)], skip=torch.tensor(True))
    assert torch.equal(before["tensors"]["p0"]["mean"], vgs.state_dict()["tensors"]["p0"]["mean"])
    assert vgs.statistics()["global"].skipped_steps == 1


def test_consecutive_non_finite_steps_raise_after_the_limit():
    named = params_like(2)
    vgs = make(named, max_nonfinite_steps=4)
    feed(vgs, named, [[torch.ones(2)]])
    with (
        pytest.warns(UserWarning, match="non-finite"),
        pytest.raises(FloatingPointError, match="consecutive"),
    ):
        feed(vgs, named, [[torch.full((2,), float("nan"))]] * 8)


def test_isolated_non_finite_steps_only_warn():
    named = params_like(2)
    vgs = make(named, max_nonfinite_steps=4)
    steps = [
        [torch.full((2,), float("nan"))] if k % 3 == 0 else [torch.ones(2) * k] for k in range(12)
    ]
    with pytest.warns(UserWarning, match="non-finite gradients were skipped"):
        feed(vgs, named, steps)
    assert vgs.statistics()["global"].nonfinite_steps == 4
