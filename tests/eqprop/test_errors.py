"""Bad input: clear errors naming the argument; divergence never leaks NaN into gradients."""

import warnings
from typing import ClassVar

import pytest
import torch

from gradstats.eqprop import (
    ConvergenceWarning,
    DivergenceError,
    EquilibriumModule,
    estimate_gradient,
    relax,
)
from gradstats.eqprop.models import LinearModel, TanhModel
from gradstats.errors import ConfigurationError, ConfigurationTypeError

from ._cases import gen, tanh_case


class RealOnly(TanhModel):
    holomorphic = False


class Moded(TanhModel):
    """A model whose holomorphic extension exists only in one mode (like the transformer)."""

    def __init__(self, base, mode):
        super().__init__(base.W.data, base.U.data, base.b.data, base.C.data)
        self.mode = mode

    def supported_methods(self):
        methods = ("implicit", "bptt", "ep", "ep_symmetric", "aep")
        return (*methods, "holomorphic") if self.mode == "thick" else methods


@pytest.fixture
def case():
    return tanh_case()


def test_unknown_method(case):
    with pytest.raises(ConfigurationError, match=r"method must be one of .*'aep'.*got 'eqprop'"):
        estimate_gradient(*case, method="eqprop")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "aep", "beta": -0.1}, "beta must be a finite float > 0"),
        ({"method": "aep", "beta": float("nan")}, "beta must be a finite float > 0"),
        ({"method": "holomorphic", "beta": 0.0}, r"radius r"),
        ({"method": "holomorphic", "points": 1}, "points must be an int >= 2"),
        ({"method": "aep", "tol": -1e-3}, "tol must be a finite float >= 0"),
        ({"method": "aep", "tol_adjoint": float("inf")}, "tol_adjoint must be a finite float"),
        ({"method": "aep", "step_size": 0}, "step_size must be a finite float > 0"),
        ({"method": "aep", "max_steps": 0}, "max_steps must be an int >= 1"),
        ({"method": "aep", "anchor": "moving"}, "anchor must be one of 'fixed', 'tracking'"),
        ({"method": "implicit", "adjoint_solver": "cg"}, "adjoint_solver must be one of"),
        ({"method": "aep", "on_failure": "ignore"}, "on_failure must be one of"),
        ({"method": "aep", "nonfinite": "ignore"}, "nonfinite must be one of 'skip', 'raise'"),
        ({"method": "aep", "nonfinite": 1}, "nonfinite must be one of"),
        ({"method": "aep", "freeze": 1}, "freeze must be a bool"),
        ({"method": "aep", "check_every": 2.5}, "check_every must be an int"),
        ({"method": "aep", "stall_checks": -1}, "stall_checks must be an int >= 0"),
        ({"method": "implicit", "gmres_restart": 0}, "gmres_restart must be an int >= 1"),
        ({"method": "holomorphic", "correction": "yes"}, "correction must be a bool"),
        ({"method": "bptt", "steps": 0}, "steps must be an int >= 1"),
        ({"method": "aep", "beta": "0.1"}, "beta must be a finite float > 0; got str"),
        ({"method": "aep", "divergence_factor": 0.5}, "divergence_factor must be > 1"),
        ({"method": "implicit", "beta": 0.1}, "beta does not apply to method='implicit'"),
        ({"method": "aep", "points": 4}, "points does not apply to method='aep'"),
        ({"method": "ep", "anchor": "fixed"}, "anchor does not apply to method='ep'"),
        ({"method": "aep", "steps": 5}, "steps does not apply to method='aep'"),
        ({"method": "holomorphic", "correction": False, "anchor": "fixed"}, "anchor applies only"),
    ],
)
def test_bad_settings(case, kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        estimate_gradient(*case, **kwargs)


def test_points_must_be_an_int(case):
    with pytest.raises(ConfigurationTypeError, match="points must be an int"):
        estimate_gradient(*case, method="holomorphic", points=4.0)


def test_holomorphic_on_a_real_only_model_names_both(case):
    base, x, y = case
    model = RealOnly(base.W.data, base.U.data, base.b.data, base.C.data)
    with pytest.raises(
        ConfigurationError, match=r"method='holomorphic'.*RealOnly.*holomorphic=False"
    ):
        estimate_gradient(model, x, y, "holomorphic")


def test_a_mode_that_does_not_support_the_method_is_rejected_by_name(case):
    base, x, y = case
    with pytest.raises(
        ConfigurationError, match=r"method='holomorphic' is not supported by Moded\(mode='real'\)"
    ):
        estimate_gradient(Moded(base, "real"), x, y, "holomorphic")
    estimate_gradient(Moded(base, "thick"), x, y, "holomorphic")  # supported there


def test_holomorphic_needs_real_parameters(case):
    base, x, y = case
    model = TanhModel(base.W.data, base.U.data, base.b.data, base.C.data)
    model.W = torch.nn.Parameter(torch.complex(base.W.data, base.W.data))
    with pytest.raises(ConfigurationError, match="needs real parameters"):
        estimate_gradient(model, x, y, "holomorphic")


def test_unknown_model_default_is_rejected(case):
    base, x, y = case

    class Typo(TanhModel):
        solver_defaults: ClassVar[dict] = {"stepsize": 0.3}

    model = Typo(base.W.data, base.U.data, base.b.data, base.C.data)
    with pytest.raises(
        ConfigurationError, match=r"solver_defaults has unknown setting\(s\) \['stepsize'\]"
    ):
        estimate_gradient(model, x, y, "aep")


def test_model_defaults_are_used_and_explicit_arguments_win(case):
    base, x, y = case

    class Tuned(TanhModel):
        solver_defaults: ClassVar[dict] = {"step_size": 0.8, "beta": {"aep": 0.02}, "tol": 1e-7}

    model = Tuned(base.W.data, base.U.data, base.b.data, base.C.data)
    est = estimate_gradient(model, x, y, "aep")
    assert (est.settings["step_size"], est.settings["beta"], est.settings["tol"]) == (
        0.8,
        0.02,
        1e-7,
    )
    est = estimate_gradient(model, x, y, "aep", beta=0.03, step_size=0.6)
    assert (est.settings["step_size"], est.settings["beta"]) == (0.6, 0.03)


def test_not_a_model():
    with pytest.raises(ConfigurationTypeError, match="model must be an EquilibriumModule"):
        estimate_gradient(torch.nn.Linear(2, 2), torch.zeros(1, 2), torch.zeros(1, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": [[0.0] * 4] * 5}, "x must be a torch.Tensor; got list"),
        ({"y": 1.0}, "y must be a torch.Tensor; got float"),
        ({"z0": [0.0]}, "z0 must be a torch.Tensor; got list"),
        ({"noise": {"mask": torch.ones(1)}}, "noise must be a NoiseRealization; got dict"),
    ],
)
def test_bad_data_arguments(case, kwargs, match):
    model, x, y = case
    args = {"x": x, "y": y, **kwargs}
    with pytest.raises(ConfigurationTypeError, match=match):
        estimate_gradient(model, method="aep", **args)


def test_relax_rejects_a_bad_start(case):
    model, x, _ = case
    with pytest.raises(ConfigurationTypeError, match=r"z0 must be a torch\.Tensor; got int"):
        relax(model, x, z0=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda z: z[:, :-1], r"z0 has shape \(5, 7\) but .* has shape \(5, 8\)"),
        (lambda z: z[:-1], r"z0 has shape \(4, 8\) but .* has shape \(5, 8\)"),
        (lambda z: z.float(), r"z0 has dtype torch\.float32 but .* has dtype torch\.float64"),
    ],
    ids=["width", "batch", "dtype"],
)
def test_relax_and_estimators_reject_a_start_that_is_not_the_models_state(case, change, match):
    model, x, y = case
    z, _ = relax(model, x, tol=1e-8)
    assert z.shape == (5, 8)
    with pytest.raises(ConfigurationError, match=match):
        relax(model, x, z0=change(z))
    with pytest.raises(ConfigurationError, match=match):
        estimate_gradient(model, x, y, method="aep", z0=change(z))
    relax(model, x, z0=z)  # the model's own state is accepted


def test_force_with_wrong_shape(case):
    base, x, y = case

    class Bad(TanhModel):
        def force(self, z, x):
            return super().force(z, x)[:, :3]

    model = Bad(base.W.data, base.U.data, base.b.data, base.C.data)
    with pytest.raises(
        ConfigurationError, match="force must return a tensor shaped like the state"
    ):
        estimate_gradient(model, x, y, "aep")


def test_non_scalar_loss(case):
    base, x, y = case

    class Bad(TanhModel):
        def loss(self, z, y):
            return (z @ self.C.T - y) ** 2

    model = Bad(base.W.data, base.U.data, base.b.data, base.C.data)
    with pytest.raises(ConfigurationError, match="loss must return a scalar"):
        estimate_gradient(model, x, y, "implicit")


def test_non_holomorphic_loss_is_caught(case):
    base, x, y = case

    class AbsSquared(TanhModel):
        def loss(self, z, y):
            r = z @ self.C.to(z.dtype).T - y
            return 0.5 * (r.abs() ** 2).sum()

    model = AbsSquared(base.W.data, base.U.data, base.b.data, base.C.data)
    with pytest.raises(ConfigurationError, match="use squares, not abs"):
        estimate_gradient(model, x, y, "holomorphic")


def _diverging(case):
    """F = 0.5 z + Bx: the relaxation grows like 1.25^t from z = 0."""
    base, x, y = case
    return LinearModel(0.5 * torch.eye(8), base.U.data, base.C.data), x, y


@pytest.mark.parametrize("method", ["implicit", "aep", "bptt"])
def test_diverging_relaxation_raises(case, method):
    model, x, y = _diverging(case)
    with pytest.raises(DivergenceError, match="diverged"):
        estimate_gradient(model, x, y, method, max_steps=2000, tol=0.0)


@pytest.mark.parametrize("method", ["implicit", "aep", "bptt"])
def test_diverging_relaxation_can_be_skipped_without_nan(case, method):
    model, x, y = _diverging(case)
    est = estimate_gradient(model, x, y, method, max_steps=2000, tol=0.0, nonfinite="skip")
    assert est.skipped
    assert "diverged" in est.reason
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in est.grads.values())
    model.A.grad = None
    assert est.write_grads(model) is False
    assert model.A.grad is None


def test_nan_input_is_never_a_nan_gradient(case):
    model, x, y = case
    x = x.clone()
    x[1, 2] = float("nan")
    with pytest.raises(DivergenceError):
        estimate_gradient(model, x, y, "aep")
    est = estimate_gradient(model, x, y, "aep", nonfinite="skip")
    assert est.skipped
    with pytest.raises(DivergenceError):
        relax(model, x)


def test_cap_warns_and_marks_unconverged(case):
    model, x, y = case
    with pytest.warns(ConvergenceWarning, match="nudged phase: 5 of 5 samples did not reach"):
        est = estimate_gradient(model, x, y, "aep", max_steps_adjoint=3, tol_adjoint=1e-10)
    assert not est.stats["nudged"].converged.any()
    assert est.stats["free"].converged.all()
    assert not est.converged()


def test_unattainable_tolerance_stalls_instead_of_running_to_the_cap(case):
    model, x, y = case
    with pytest.warns(ConvergenceWarning, match="stalled"):
        est = estimate_gradient(
            model, x, y, "aep", beta=1e-6, tol_adjoint=1e-16, max_steps_adjoint=100_000
        )
    nudged = est.stats["nudged"]
    assert int(nudged.steps.max()) < 5000
    assert nudged.extra["stalled"].all()


def test_abstract_model_methods_say_what_is_missing():
    class Empty(EquilibriumModule):
        pass

    with pytest.raises(NotImplementedError, match="must define init_state"):
        Empty().init_state(torch.zeros(1))


@pytest.mark.parametrize("method", ["implicit", "bptt", "ep", "ep_symmetric", "aep", "holomorphic"])
def test_no_warnings_at_default_settings(case, method):
    model, x, y = case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate_gradient(model, x, y, method, generator=gen(0))
