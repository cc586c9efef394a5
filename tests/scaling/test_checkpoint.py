"""Checkpoints keyed by parameter name: bitwise resume, clear mismatch errors, rebind."""

import io
import warnings

import pytest
import torch

from gradstats import VarianceGradientScaler
from gradstats.errors import StateError
from gradstats.testing import assert_state_equal

from ._helpers import assert_same, snapshot


def _model(seed=0, hidden=4):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )


def _step(model, opt, vgs, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(8, 3, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
    vgs.step()
    with vgs.apply(opt):
        opt.step()


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _make(model, opt, **kwargs):
    return VarianceGradientScaler(
        model.named_parameters(),
        optimizer=opt,
        beta=0.8,
        max_rate=0.3,
        **{"statistic": "temporal", "rule": "shrink", **kwargs},
    )


@pytest.mark.parametrize("statistic", ["temporal", "tensor_mean", "same_point"])
def test_save_load_continue_is_bitwise_equal_to_an_uninterrupted_run(statistic):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        vgs = _make(model, opt, statistic=statistic)
        for k in range(5):
            _step(model, opt, vgs, k)
        saved = _roundtrip(
            {"model": model.state_dict(), "opt": opt.state_dict(), "vgs": vgs.state_dict()}
        )
        for k in range(5, 12):
            _step(model, opt, vgs, k)
        resumed_model = _model(seed=99)
        resumed_model.load_state_dict(saved["model"])
        resumed_opt = torch.optim.SGD(resumed_model.parameters(), lr=0.05, momentum=0.9)
        resumed_opt.load_state_dict(saved["opt"])
        resumed = _make(resumed_model, resumed_opt, statistic=statistic)
        resumed.load_state_dict(saved["vgs"])
        for k in range(5, 12):
            _step(resumed_model, resumed_opt, resumed, k)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_same(vgs.state_dict(), resumed.state_dict())
    assert vgs.get_scaling_factor() == resumed.get_scaling_factor()


def _trained_scaler():
    model = _model()
    vgs = VarianceGradientScaler(model.named_parameters(), statistic="temporal", rule="shrink")
    _step(model, torch.optim.SGD(model.parameters(), lr=0.0), vgs, 0)
    return vgs


def test_mismatched_shapes_are_listed():
    other = VarianceGradientScaler(
        _model(hidden=5).named_parameters(), statistic="temporal", rule="shrink"
    )
    with pytest.raises(
        StateError, match=r"shape/state mismatch \['0.weight', '0.bias', '2.weight'\]"
    ):
        other.load_state_dict(_trained_scaler().state_dict())


def test_mismatched_names_are_listed():
    renamed = VarianceGradientScaler(
        [(f"layer.{n}", p) for n, p in _model().named_parameters()],
        statistic="temporal",
        rule="shrink",
    )
    with pytest.raises(StateError, match=r"missing.*layer\.0\.weight.*unexpected.*'0\.weight'"):
        renamed.load_state_dict(_trained_scaler().state_dict())


def test_strict_false_loads_what_matches_and_warns():
    model = _model()
    vgs = VarianceGradientScaler(model.named_parameters(), statistic="temporal", rule="shrink")
    _step(model, torch.optim.SGD(model.parameters(), lr=0.0), vgs, 0)
    other = VarianceGradientScaler(
        _model(hidden=5).named_parameters(), statistic="temporal", rule="shrink"
    )
    with pytest.warns(UserWarning, match="partially loaded"):
        report = other.load_state_dict(vgs.state_dict(), strict=False)
    assert report.loaded == ("2.bias",)
    assert set(report.mismatched) == {"0.weight", "0.bias", "2.weight"}
    assert other.state_dict()["tensors"]["2.bias"]["count"].item() == 1


def test_nothing_changes_when_a_strict_load_fails():
    model = _model()
    vgs = VarianceGradientScaler(model.named_parameters(), statistic="temporal", rule="shrink")
    _step(model, torch.optim.SGD(model.parameters(), lr=0.0), vgs, 0)
    before = snapshot(vgs)
    broken = VarianceGradientScaler(
        _model(hidden=5).named_parameters(), statistic="temporal", rule="shrink"
    ).state_dict()
    with pytest.raises(StateError, match="shape/state mismatch"):
        vgs.load_state_dict(broken)
    assert_same(before, snapshot(vgs))


def test_checkpoint_statistic_must_match():
    state = VarianceGradientScaler(
        _model().named_parameters(), statistic="same_point", rule="shrink"
    ).state_dict()
    with pytest.raises(ValueError, match="statistic='same_point'"):
        VarianceGradientScaler(
            _model().named_parameters(), statistic="temporal", rule="shrink"
        ).load_state_dict(state)


def test_constructor_config_wins_unless_asked():
    state = VarianceGradientScaler(
        _model().named_parameters(), alpha=3.0, statistic="temporal", rule="shrink"
    ).state_dict()
    vgs = VarianceGradientScaler(
        _model().named_parameters(), alpha=1.0, statistic="temporal", rule="shrink"
    )
    report = vgs.load_state_dict(state)
    assert vgs.config.alpha == 1.0
    assert report.config_differences["alpha"] == (3.0, 1.0)


def test_checkpoint_config_is_adopted_when_asked():
    state = VarianceGradientScaler(
        _model().named_parameters(), alpha=3.0, statistic="temporal", rule="shrink"
    ).state_dict()
    vgs = VarianceGradientScaler(
        _model().named_parameters(), alpha=1.0, statistic="temporal", rule="shrink"
    )
    vgs.load_state_dict(state, use_checkpoint_config=True)
    assert vgs.config.alpha == 3.0


def test_rebind_after_model_and_optimizer_recreation_keeps_matching_statistics():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    vgs = VarianceGradientScaler(model.named_parameters(), statistic="temporal", rule="shrink")
    for k in range(3):
        _step(model, opt, vgs, k)
    before = vgs.state_dict()["tensors"]
    bigger = _model(hidden=4)
    bigger.add_module("3", torch.nn.Linear(1, 1))
    report = vgs.rebind(bigger.named_parameters(), torch.optim.SGD(bigger.parameters(), lr=0.0))
    assert set(report.loaded) == set(before)
    assert set(report.missing) == {"3.weight", "3.bias"}
    after = vgs.state_dict()["tensors"]
    assert torch.equal(after["0.weight"]["mean"], before["0.weight"]["mean"])
    assert after["3.weight"]["count"].item() == 0
    bigger(torch.randn(2, 3)).sum().backward()
    vgs.step()  # the hooks follow the new tensors
    assert vgs.updates == 4


def test_reference_checkpoint_loads_into_the_fast_implementation():
    model = _model()
    ref = VarianceGradientScaler(
        model.named_parameters(),
        foreach=False,
        confidence=None,
        statistic="temporal",
        rule="shrink",
    )
    fast = VarianceGradientScaler(
        model.named_parameters(), confidence=None, statistic="temporal", rule="shrink"
    )
    for k in range(4):
        model.zero_grad()
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(k))
        model(x).pow(2).mean().backward()
        ref.step()
        fast.step()
    converted = VarianceGradientScaler(
        model.named_parameters(), confidence=None, statistic="temporal", rule="shrink"
    )
    converted.load_state_dict(ref.state_dict())
    converted.refresh()
    fast_stats, conv_stats = fast.statistics(), converted.statistics()
    assert conv_stats["0.weight"].variance == pytest.approx(
        fast_stats["0.weight"].variance, rel=1e-6
    )
    with pytest.raises(StateError, match="mismatch"):
        VarianceGradientScaler(
            model.named_parameters(), foreach=False, statistic="temporal", rule="shrink"
        ).load_state_dict(fast.state_dict())


def test_state_dict_is_keyed_by_name_with_shape_dtype_version_config():
    state = VarianceGradientScaler(
        _model().named_parameters(), statistic="temporal", rule="shrink"
    ).state_dict()
    assert state["format"] == "gradstats.VarianceGradientScaler"
    assert state["version"] == 1
    assert state["config"]["statistic"] == "temporal"
    assert state["tensors"]["0.weight"]["shape"] == [4, 3]
    assert state["tensors"]["0.weight"]["dtype"] == str(torch.get_default_dtype()).removeprefix(
        "torch."
    )


def test_other_version_is_rejected():
    state = VarianceGradientScaler(
        _model().named_parameters(), statistic="temporal", rule="shrink"
    ).state_dict()
    with pytest.raises(StateError, match="version 7; this gradstats reads version 1"):
        VarianceGradientScaler(
            _model().named_parameters(), statistic="temporal", rule="shrink"
        ).load_state_dict({**state, "version": 7})


def _trained_fast(dtype=torch.float64):
    model = _model().to(dtype)
    vgs = VarianceGradientScaler(
        model.named_parameters(), confidence=None, statistic="temporal", rule="shrink"
    )
    for k in range(4):
        model.zero_grad()
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(k), dtype=dtype)
        model(x).pow(2).mean().backward()
        vgs.step()
    return model, vgs


def test_checkpoint_of_the_earlier_fast_format_loads():
    """Earlier versions stored only q = sq_ema = Σ_k w_k‖g_k‖²: Σ_i v_i = q − ‖m‖² on load."""
    model, vgs = _trained_fast()
    state = vgs.state_dict()
    for entry in state["tensors"].values():
        del entry["var_sum"], entry["mean_sq"]
    loaded = VarianceGradientScaler(
        model.named_parameters(), confidence=None, statistic="temporal", rule="shrink"
    )
    loaded.load_state_dict(state)
    loaded.refresh()
    ours, theirs = loaded.statistics(), vgs.statistics()
    for name in vgs.layout.names:  # (aggregates need a step: they sum the present tensors)
        assert ours[name].variance == pytest.approx(theirs[name].variance, rel=1e-9)
        assert ours[name].signal == pytest.approx(theirs[name].signal, rel=1e-12)


def test_fast_checkpoint_round_trip_is_bitwise():
    model, vgs = _trained_fast(torch.float32)
    loaded = VarianceGradientScaler(
        model.named_parameters(), confidence=None, statistic="temporal", rule="shrink"
    )
    loaded.load_state_dict(vgs.state_dict())
    assert_state_equal(loaded.state_dict(), vgs.state_dict())


def test_fast_checkpoint_carries_sq_ema_for_earlier_readers():
    _, vgs = _trained_fast()
    for entry in vgs.state_dict()["tensors"].values():
        assert entry["sq_ema"] == pytest.approx(float(entry["var_sum"] + entry["mean_sq"]))
