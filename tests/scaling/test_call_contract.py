"""Calls that must fail before they change anything: bad ``skip``, a mismatched optimizer in
``apply()``, bad ``observe()`` entries; and ``skip`` honoured under ``nonfinite="raise"``."""

import pytest
import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError

from ._helpers import assert_same, feed, make, params_like, snapshot


def _primed(**kwargs):
    named = params_like((2, 3), (2,))
    vgs = feed(
        make(named, **{"statistic": "temporal", "rule": "shrink", **kwargs}),
        named,
        [[torch.ones(6), torch.ones(2)]] * 2,
    )
    for _, p in named:
        p.grad = torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(1))
    return named, vgs


@pytest.mark.parametrize(
    ("skip", "error", "message"),
    [
        (torch.tensor([True, False]), ConfigurationError, r"0-dim .* shape \(2,\)"),
        (torch.tensor(1 + 1j), ConfigurationError, "0-dim bool or real tensor"),
        ("yes", ConfigurationTypeError, "skip must be a bool or a 0-dim tensor; got str"),
        (1, ConfigurationTypeError, "got int"),
    ],
    ids=["vector", "complex", "string", "int"],
)
def test_a_bad_skip_is_refused_before_anything_changes(skip, error, message):
    _, vgs = _primed()
    before = snapshot(vgs)
    with pytest.raises(error, match=message):
        vgs.update_statistics(skip=skip)
    assert_same(snapshot(vgs), before)


@pytest.mark.parametrize(
    ("skip", "skipped"), [(torch.tensor(1.0), 1), (torch.tensor(0.0), 0), (True, 1)]
)
def test_a_numeric_skip_tensor_means_non_zero(skip, skipped):
    _, vgs = _primed()
    vgs.update_statistics(skip=skip)
    assert int(vgs.skipped) == skipped


@pytest.mark.parametrize("skip", [True, torch.tensor(True), torch.tensor(1.0)])
def test_nonfinite_raise_does_not_raise_for_an_update_the_caller_skips(skip):
    named, vgs = _primed(nonfinite="raise")
    named[0][1].grad[0, 0] = float("inf")
    vgs.update_statistics(skip=skip)  # an AMP overflow step: skipped, counted, no error
    assert int(vgs.skipped) == 1


def test_apply_checks_the_optimizer_before_reading_the_gradients():
    model = torch.nn.Linear(3, 2)
    own = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1)
    vgs = make(
        model.named_parameters(),
        apply_to="lr",
        aggregate="param_group",
        optimizer=own,
        statistic="temporal",
        rule="shrink",
    )
    model(torch.randn(4, 3)).sum().backward()
    before = snapshot(vgs)
    with pytest.raises(ConfigurationError, match="optimizer has 2 param groups"), vgs.apply(other):
        pass
    assert_same(snapshot(vgs), before)


@pytest.mark.parametrize(
    ("grads", "error", "message"),
    [
        ([torch.ones(2, 3), "oops"], ConfigurationTypeError, r"grads\['p1'\] must be a torch"),
        ([torch.ones(5, 5), torch.ones(2)], ConfigurationError, r"grads\['p0'\] must have"),
        ([torch.ones(2, 3), torch.ones(2, dtype=torch.int64)], ConfigurationTypeError, "float"),
    ],
    ids=["not-a-tensor", "wrong-shape", "integer"],
)
def test_observe_checks_every_entry_before_recording_any(grads, error, message):
    named = params_like((2, 3), (2,))
    vgs = make(named, statistic="same_point", rule="shrink")
    before = snapshot(vgs)
    with pytest.raises(error, match=message):
        vgs.observe(grads)
    assert_same(snapshot(vgs), before)
    clean_named = params_like((2, 3), (2,))
    clean = make(clean_named, statistic="same_point", rule="shrink")
    for scaler, params in ((vgs, named), (clean, clean_named)):  # the next step is unaffected
        scaler.observe([torch.ones(2, 3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)])
        scaler.observe([torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)])
        for _, p in params:
            p.grad = torch.full(p.shape, 0.5, dtype=p.dtype)
        scaler.step()
    assert_same(vgs.state_dict(), clean.state_dict())
