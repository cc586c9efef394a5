"""The estimator registry is the one home of each method's knowledge (issue 11, item 4)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from gradstats.eqprop import (
    ESTIMATORS,
    LIBRARY_DEFAULTS,
    METHODS,
    SWEEPS,
    SolverSettings,
    estimate_gradient,
    get_estimator,
)
from gradstats.eqprop._settings import SOLVER_KEYS, setting_keys
from gradstats.eqprop.models import TanhModel
from gradstats.eqprop.train import EP_METHODS, TRAIN_METHODS, TrainConfig
from gradstats.eqprop.train._config import APPLIES_TO
from gradstats.errors import ConfigurationError, ConfigurationTypeError

# a value each estimator-specific setting accepts (to probe what an estimator accepts)
_VALUES = {"beta": 0.05, "points": 4, "anchor": "fixed", "correction": True, "steps": 5}


def _problem():
    gen = torch.Generator().manual_seed(0)
    model = TanhModel.random(6, 3, 2, generator=gen)
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    y = torch.randn(4, 2, dtype=torch.float64, generator=gen)
    return model, x, y


def test_every_method_listed_anywhere_comes_from_the_registry():
    assert tuple(ESTIMATORS) == METHODS
    assert set(EP_METHODS) <= set(METHODS)
    assert (*EP_METHODS, "backprop") == TRAIN_METHODS
    assert EP_METHODS == ("aep", "holomorphic", "ep_symmetric", "implicit", "bptt")
    assert set(SWEEPS) == {axis for e in ESTIMATORS.values() for axis in e.sweeps}
    for option, methods in APPLIES_TO.items():
        assert set(methods) <= set(TRAIN_METHODS), option
    help_text = dataclasses.fields(TrainConfig)[0].metadata["help"]
    assert help_text == "estimator: " + "|".join(TRAIN_METHODS)


def test_library_defaults_come_from_the_estimators():
    assert LIBRARY_DEFAULTS["beta"] == {e.name: e.defaults["beta"] for e in ESTIMATORS.values()
                                        if e.nudged}  # fmt: skip
    assert set(LIBRARY_DEFAULTS) == set(setting_keys())
    assert {f.name for f in dataclasses.fields(SolverSettings)} == set(SOLVER_KEYS)


@pytest.mark.parametrize("name", METHODS)
def test_declared_settings_are_exactly_what_the_estimator_accepts(name):
    model, x, y = _problem()
    estimator = get_estimator(name)
    for key, value in _VALUES.items():
        accepted = key in estimator.option_names
        kw = {key: value, "correction": True} if key == "anchor" and name == "holomorphic" else {
            key: value}  # fmt: skip
        if accepted:
            est = estimate_gradient(model, x, y, name, max_steps=50, max_steps_adjoint=50, **kw)
            assert est.settings[key] == value
        else:
            with pytest.raises(ConfigurationError, match=f"{key} does not apply to method"):
                estimate_gradient(model, x, y, name, **kw)
    est = estimate_gradient(model, x, y, name, max_steps=50, max_steps_adjoint=50)
    assert set(est.stats) == set(estimator.phases)
    assert set(est.settings) == {"method", *setting_keys()}


@pytest.mark.parametrize("name", METHODS)
def test_settings_records_give_the_keyword_results(name):
    model, x, y = _problem()
    estimator = get_estimator(name)
    kw = {"max_steps": 40, "tol": 1e-10, "max_steps_adjoint": 60, "step_size": 0.4}
    options = {k: v for k, v in _VALUES.items() if k in estimator.option_names}
    if name == "holomorphic":
        options["anchor"] = "tracking"
    by_keyword = estimate_gradient(model, x, y, name, **kw, **options)
    by_record = estimate_gradient(
        model, x, y, name, solver=SolverSettings(**kw), options=estimator.options(**options)
    )
    for param in by_keyword.grads:
        torch.testing.assert_close(by_record.grads[param], by_keyword.grads[param], rtol=0, atol=0)
    assert by_record.settings == by_keyword.settings


def test_a_setting_given_twice_or_a_wrong_record_is_an_error():
    model, x, y = _problem()
    with pytest.raises(ConfigurationError, match="max_steps is given as a keyword and in a"):
        estimate_gradient(model, x, y, "aep", max_steps=5, solver=SolverSettings(max_steps=6))
    with pytest.raises(ConfigurationTypeError, match="options of method='aep' must be a AEPOpt"):
        estimate_gradient(model, x, y, "aep", options=get_estimator("bptt").options(steps=3))
    with pytest.raises(ConfigurationTypeError, match="solver must be a SolverSettings"):
        estimate_gradient(model, x, y, "aep", solver={"max_steps": 5})


def test_unknown_method_error_names_the_valid_values():
    with pytest.raises(ConfigurationError) as info:
        get_estimator("eqprop")
    for name in METHODS:
        assert repr(name) in str(info.value)
    model, x, y = _problem()
    with pytest.raises(ConfigurationError, match="method must be one of 'implicit', 'bptt'"):
        estimate_gradient(model, x, y, "eqprop")


def test_model_support_comes_from_the_estimators_model_kinds():
    model, _, _ = _problem()
    assert model.holomorphic
    assert model.supported_methods() == METHODS
    model.holomorphic = False  # a real model: only the estimators of real models
    assert model.supported_methods() == tuple(
        e.name for e in ESTIMATORS.values() if "real" in e.model_kinds
    )
    assert "holomorphic" not in model.supported_methods()
    assert get_estimator("holomorphic").model_kinds == ("holomorphic",)


@pytest.mark.parametrize("name", METHODS)
def test_sweep_settings_set_what_t1_and_t2_mean(name):
    estimator = get_estimator(name)
    for axis in estimator.sweeps:
        settings = estimator.sweep_settings(axis, 7)
        keys = {"T1": estimator.t1_keys, "T2": estimator.t2_keys}.get(axis, (axis,))
        assert all(settings[k] == 7 for k in keys)
    missing = set(SWEEPS) - set(estimator.sweeps)
    for axis in missing:
        with pytest.raises(ConfigurationError, match=f"sweep {axis!r} does not apply"):
            estimator.sweep_settings(axis, 1)


@pytest.mark.parametrize("method", EP_METHODS)
def test_the_trainers_records_are_its_old_keyword_settings(method):
    base = {"method": method, "t1": 12}
    extra = {"aep": {"beta": 0.1, "anchor": "fixed"}, "holomorphic": {"points": 6}}
    cfg = TrainConfig(**base, **extra.get(method, {}))
    given = {**cfg.solver_settings().given(), **cfg.method_options().given()}
    if method == "bptt":
        assert given == {"steps": 12}
    else:
        assert given["max_steps"] == 12
        assert given["max_steps_adjoint"] == cfg.t2
    for key, value in extra.get(method, {}).items():
        assert given[key] == value


def test_no_warning_on_the_canonical_names():
    model, x, y = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        estimate_gradient(model, x, y, "bptt", steps=5)
        estimate_gradient(model, x, y, "aep", solver=SolverSettings(max_steps=30))
