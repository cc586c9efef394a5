"""The defaults (issue 13 item 2): ``statistic="auto"`` and ``rule="adascale"`` at S = 1.

The step is exactly the unscaled baseline's (which never loses to itself) while the scaler
measures and reports the noise; "no detectable signal" never means a zero step; ``"auto"`` is
``"per_sample"`` with ``model=``, else ``"same_point"`` — never ``"temporal"``.
"""

import copy
import io
import math
import re
import warnings

import pytest
import torch

from gradstats import VarianceGradientScaler
from gradstats.errors import ConfigurationError, StateError
from gradstats.integrations._options import with_model
from gradstats.scaling import (
    ScalerConfig,
    get_statistic,
    init,
    register_statistic,
    registered_statistics,
    resolve_statistic,
    statistic_choices,
)
from gradstats.scaling._rules import batch_scale
from gradstats.scaling._same_point import STARVED_UPDATES
from gradstats.scaling._statistic import StatisticSpec, takes_model

from ._helpers import assert_same, feed, params_like


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()


def _batch(k, size=16):
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(size, 5, generator=g, dtype=torch.float64)
    return x, torch.sin(x.sum(1, keepdim=True))


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------------------ the defaults
def test_the_defaults_are_auto_and_adascale_with_min_scale_zero():
    config = ScalerConfig()
    assert (config.statistic, config.rule, config.min_scale) == ("auto", "adascale", 0.0)
    assert (config.scale, config.base_batch_size) == (None, None)
    assert batch_scale(config) == 1.0
    assert batch_scale(ScalerConfig(batch_size=32)) == 1.0  # batch_size alone: B_noise only
    assert batch_scale(ScalerConfig(batch_size=32, base_batch_size=8)) == 4.0


def test_auto_resolves_to_per_sample_with_a_model():
    model = _mlp()
    vgs = VarianceGradientScaler(model.named_parameters(), model=model)
    assert vgs.config.statistic == "per_sample"
    assert vgs.config.rule == "adascale"
    assert "statistic='per_sample'" in repr(vgs)
    assert vgs.state_dict()["config"]["statistic"] == "per_sample"


def test_auto_resolves_to_same_point_without_a_model():
    vgs = VarianceGradientScaler(_mlp().named_parameters())
    assert vgs.config.statistic == "same_point"
    assert vgs.state_dict()["config"]["statistic"] == "same_point"


@pytest.mark.parametrize("has_model", [True, False])
def test_auto_never_resolves_to_temporal(has_model):
    assert resolve_statistic("auto", has_model) in ("per_sample", "same_point")
    assert ScalerConfig().resolved(_mlp() if has_model else None).statistic != "temporal"


def test_explicit_statistics_are_not_resolved():
    for name in registered_statistics():
        assert resolve_statistic(name, has_model=True) == name
        config = ScalerConfig(statistic=name, rule="shrink")
        assert config.resolved(_mlp()) is config


def test_auto_is_a_valid_choice_and_named_by_the_error():
    assert statistic_choices() == ("auto", *registered_statistics())
    assert "auto" not in registered_statistics()
    with pytest.raises(ConfigurationError, match="statistic must be one of 'auto', 'temporal'"):
        ScalerConfig(statistic="noise")
    with pytest.raises(ConfigurationError, match=r"'auto'.*got 'noise'"):
        VarianceGradientScaler(params_like(2), statistic="noise")


def test_auto_names_no_statistic_until_resolved():
    with pytest.raises(ConfigurationError, match="statistic='auto' is resolved when"):
        get_statistic("auto")
    with pytest.raises(ConfigurationError, match=r"config\.resolved"):
        init(ScalerConfig(), params_like(2))  # the functional core: resolve first
    state = init(ScalerConfig().resolved(), params_like(2))
    assert state.updates == 0


def test_the_name_auto_cannot_be_registered():
    spec = get_statistic("temporal")
    fake = StatisticSpec(
        "auto", lambda *a: None, spec.state_keys, spec.min_count
    )  # a statistic named like the choice
    with pytest.raises(ConfigurationError, match="'auto' is reserved"):
        register_statistic(fake)


def test_takes_model():
    assert takes_model("auto")
    assert takes_model("per_sample")
    assert not takes_model("temporal")
    assert not takes_model("same_point")
    assert not takes_model("no-such-statistic")


def test_callbacks_pass_the_model_only_where_the_statistic_uses_it():
    model = _mlp()
    assert with_model({}, model)["model"] is model  # default "auto" -> per_sample
    assert with_model({"statistic": "per_sample"}, model)["model"] is model
    assert "model" not in with_model({"statistic": "temporal"}, model)
    assert "model" not in with_model({"statistic": "same_point"}, model)
    pinned = ScalerConfig(statistic="temporal", rule="shrink")
    assert "model" not in with_model({"config": pinned}, model)
    assert with_model({"config": ScalerConfig()}, model)["model"] is model
    other = _mlp(1)
    assert with_model({"model": other}, model)["model"] is other  # given: kept


def test_token_units_need_the_model_under_auto():
    assert ScalerConfig(unit="token").statistic == "auto"  # valid: per_sample may take it
    with pytest.raises(ConfigurationError, match=r"unit='token'.*'auto' without model="):
        VarianceGradientScaler(params_like(2), unit="token")
    model = torch.nn.Embedding(7, 3)
    vgs = VarianceGradientScaler(model.named_parameters(), model=model, unit="token")
    assert (vgs.config.statistic, vgs.config.unit) == ("per_sample", "token")


def test_model_is_refused_by_a_statistic_without_modules():
    model = _mlp()
    with pytest.raises(ConfigurationError, match=r"model= is used by .*'auto'"):
        VarianceGradientScaler(model.named_parameters(), model=model, statistic="temporal")


# ---------------------------------------------------------------- S = 1: the baseline's step
def _train(scaled, apply_to, steps=6, **kwargs):
    """(model, optimizer, scaler or None, per step: (grads seen by opt.step, lrs, factor))."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    vgs = None
    if scaled:
        vgs = VarianceGradientScaler(
            model.named_parameters(), model=model, optimizer=opt, apply_to=apply_to,
            batch_size=16, **kwargs,
        )  # fmt: skip
    trace = []
    for k in range(steps):
        opt.zero_grad()
        x, y = _batch(k)
        torch.nn.functional.mse_loss(model(x), y).backward()
        raw = [p.grad.clone() for p in model.parameters()]
        if vgs is None:
            applied = [p.grad.clone() for p in model.parameters()]
            lrs = [g["lr"] for g in opt.param_groups]
            opt.step()
        else:
            vgs.step()
            with vgs.apply(opt):
                applied = [p.grad.clone() for p in model.parameters()]
                lrs = [g["lr"] for g in opt.param_groups]
                opt.step()
        trace.append((raw, applied, lrs))
    return model, opt, vgs, trace


@pytest.mark.parametrize("apply_to", ["grad", "lr"])
def test_s_1_leaves_the_step_bitwise_unchanged_while_measuring(apply_to):
    plain, _, _, plain_trace = _train(False, apply_to)
    model, opt, vgs, trace = _train(True, apply_to)
    for (raw, applied, lrs), (p_raw, p_applied, p_lrs) in zip(trace, plain_trace, strict=True):
        for a, b in zip(raw + applied, p_raw + p_applied, strict=True):
            assert torch.equal(a, b)  # bitwise: the gradients the optimizer saw
        assert lrs == p_lrs == [0.05]  # the learning rate itself, not only its effect
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["lr"] == 0.05
    row = vgs.statistics()["global"]
    assert vgs.config.statistic == "per_sample"
    assert row.factor == 1.0
    assert vgs.get_scaling_factor() == 1.0
    assert not row.no_estimate
    assert math.isfinite(row.normalized_variance)
    assert row.B_noise > 0
    assert math.isfinite(row.B_noise_se)
    assert row.suggested_batch_size is not None
    assert row.suggested_batch_size >= 1
    assert float(vgs.progress) == 6.0  # one base-batch step per step


def test_s_1_same_point_from_micro_batches_reports_and_keeps_the_step():
    model = _mlp()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    vgs = VarianceGradientScaler(model.named_parameters(), optimizer=opt, batch_size=16)
    assert vgs.config.statistic == "same_point"
    for k in range(5):
        x, y = _batch(k)
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            optimizer.zero_grad()
            for part in range(2):
                rows = slice(8 * part, 8 * (part + 1))
                (torch.nn.functional.mse_loss(net(x[rows]), y[rows]) / 2).backward()
        vgs.step()
        with vgs.apply(opt):
            opt.step()
        ref_opt.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    row = vgs.statistics()["global"]
    assert not row.no_estimate
    assert row.B_noise is not None
    assert float(vgs.progress) == 5.0


def test_no_detectable_signal_is_never_a_zero_step_by_default():
    """Pure noise: ρ = ∞. AdaScale at S = 1 gives r = S = 1 (the baseline's step); the former
    shrink rule with min_scale=0 keeps the previous factor (test_rules has that case too)."""
    named = params_like(4)
    steps = [[torch.tensor([1.0, -1.0, 1.0, -1.0]) * (-1) ** k] for k in range(6)]
    # a measured "no signal" needs a statistic that reads one gradient per step: temporal
    ada = feed(VarianceGradientScaler(named, statistic="temporal", confidence=None), named, steps)
    assert ada.statistics()["global"].no_signal
    assert ada.get_scaling_factor() == 1.0
    shrink = feed(
        VarianceGradientScaler(named, statistic="temporal", rule="shrink", confidence=None),
        named, steps,
    )  # fmt: skip
    assert shrink.statistics()["global"].no_signal
    assert shrink.get_scaling_factor() == 1.0


# ---------------------------------------------------------------------------------- warnings
def test_auto_without_a_model_warns_once_when_it_never_gets_an_estimate():
    model = _mlp()
    vgs = VarianceGradientScaler(model.named_parameters())  # auto -> same_point
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for k in range(3 * STARVED_UPDATES):
            model.zero_grad()
            x, y = _batch(k)
            torch.nn.functional.mse_loss(model(x), y).backward()  # one backward per step
            vgs.step()
    starved = [w for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(starved) == 1
    message = str(starved[0].message)
    assert "statistic='same_point' has had no estimate" in message
    assert "pass model=" in message
    assert vgs.get_scaling_factor() == 1.0


@pytest.mark.parametrize(
    "kwargs", [{"scale": 4.0}, {"batch_size": 64, "base_batch_size": 16}, {"scale": 0.5}]
)
def test_temporal_driving_adascale_away_from_s_1_warns(kwargs):
    with pytest.warns(UserWarning, match=r"rule='adascale' \(S = .*\) driven by statistic="):
        VarianceGradientScaler(params_like(2), statistic="temporal", **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"statistic": "temporal"},  # S = 1: the gain is 1 whatever temporal reads
        {"statistic": "temporal", "batch_size": 64},
        {"statistic": "same_point", "scale": 4.0},
        {"statistic": "temporal", "rule": "shrink"},
        {},
    ],
)
def test_no_adascale_warning_otherwise(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VarianceGradientScaler(params_like(2), **kwargs)


# -------------------------------------------------------------------------------- checkpoints
def test_a_default_checkpoint_resumes_bitwise():
    def run(model, vgs, opt, steps):
        for k in steps:
            opt.zero_grad()
            x, y = _batch(k)
            torch.nn.functional.mse_loss(model(x), y).backward()
            vgs.step()
            with vgs.apply(opt):
                opt.step()

    def build():
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        vgs = VarianceGradientScaler(
            model.named_parameters(), model=model, optimizer=opt, batch_size=16
        )
        return model, opt, vgs

    model, opt, vgs = build()
    run(model, vgs, opt, range(4))
    saved = _roundtrip(
        {"vgs": vgs.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}
    )
    assert saved["vgs"]["config"]["statistic"] == "per_sample"  # the resolved statistic
    run(model, vgs, opt, range(4, 8))
    resumed_model, resumed_opt, resumed = build()
    resumed_model.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["vgs"])
    run(resumed_model, resumed, resumed_opt, range(4, 8))
    assert torch.equal(resumed.progress, vgs.progress)
    assert_same(resumed.state_dict(), vgs.state_dict())
    for a, b in zip(resumed_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_temporal_checkpoint_needs_the_explicit_former_defaults():
    named = params_like(3)
    steps = [[torch.tensor([1.0, 2.0, 3.0]) * k] for k in range(1, 5)]
    old = feed(VarianceGradientScaler(named, statistic="temporal", rule="shrink"), named, steps)
    state = _roundtrip(old.state_dict())
    with pytest.raises(StateError, match=re.escape("'temporal', rule='shrink' were the defaults")):
        VarianceGradientScaler(named).load_state_dict(state)
    again = VarianceGradientScaler(named, statistic="temporal", rule="shrink")
    again.load_state_dict(state)
    assert_same(again.state_dict(), old.state_dict())
    assert again.get_scaling_factor() == old.get_scaling_factor()


# ------------------------------------------------------------------------------------ legacy
def test_the_legacy_importer_keeps_the_original_s_temporal_and_shrink():
    from gradstats.scaling import import_legacy_state_dict

    legacy = {"vgs_version": "3.1", "alpha": 2.0, "beta": 0.9, "warmup_steps": 0}
    scaler, report = import_legacy_state_dict(legacy, params_like(2))
    assert (scaler.config.statistic, scaler.config.rule) == ("temporal", "shrink")
    assert scaler.config.alpha == 2.0
    assert report.settings["alpha"] == 2.0
