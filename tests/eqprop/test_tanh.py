"""Spec §6, non-symmetric tanh network: plain EP biased (flat in β), AEP slope 2, holomorphic."""

import itertools
import warnings

import pytest
import torch

from gradstats.eqprop import AnalyticityWarning, DivergenceError, estimate_gradient
from gradstats.testing import reference_implicit_gradient

from ._cases import TIGHT, cos, flat, float64, loglog_slope, rel, tanh_case


@pytest.fixture(scope="module")
def case():
    with float64():
        model, x, y = tanh_case()
        return model, x, y, reference_implicit_gradient(model, x, y)


def test_jacobian_is_not_symmetric(case):
    jac = case[3]["jacobian"]
    assert (jac - jac.T).norm() / jac.norm() > 0.2


@pytest.mark.parametrize("solver", ["richardson", "gmres"])
def test_implicit_matches_dense_reference(case, solver):
    model, x, y, ref = case
    est = estimate_gradient(model, x, y, "implicit", adjoint_solver=solver, **TIGHT)
    torch.testing.assert_close(est.adjoint, ref["adjoint"])
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(est.grads[name], grad)


def test_plain_ep_cosine_is_flat_in_beta(case):
    model, x, y, ref = case
    cosines = [
        cos(
            flat(estimate_gradient(model, x, y, "ep_symmetric", beta=b, **TIGHT).grads),
            flat(ref["grads"]),
        )
        for b in (0.04, 0.01, 0.0025)
    ]
    assert max(cosines) < 0.99  # biased ...
    assert max(cosines) - min(cosines) < 1e-3  # ... and shrinking β does not help


@pytest.mark.parametrize("anchor", ["fixed", "tracking"])
def test_aep_error_slope_two(case, anchor):
    model, x, y, ref = case
    betas = [0.04, 0.02, 0.01, 0.005]
    errors = [
        rel(
            estimate_gradient(model, x, y, "aep", beta=b, anchor=anchor, **TIGHT).adjoint,
            ref["adjoint"],
        )
        for b in betas
    ]
    assert loglog_slope(betas, errors) == pytest.approx(2.0, abs=0.1)
    assert errors[-1] < 2e-4


def test_holomorphic_error_geometric_in_points_for_small_radius(case):
    model, x, y, ref = case
    ns = [3, 4, 6, 8]
    errors, predicted = [], []
    for n in ns:
        est = estimate_gradient(model, x, y, "holomorphic", beta=0.1, points=n, **TIGHT)
        errors.append(rel(est.adjoint, ref["adjoint"]))
        predicted.append(float(est.stats["nudged"].extra["aliasing_error"].max()))
    assert all(b < 0.4 * a for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-4
    for err, pred in zip(errors, predicted, strict=True):  # q^N predicts the error's size
        assert pred / 10 < err < pred * 10


def test_holomorphic_near_the_radius_warns(case):
    model, x, y, _ = case
    with pytest.warns(AnalyticityWarning, match="analyticity radius"):
        estimate_gradient(model, x, y, "holomorphic", beta=0.3, points=4, **TIGHT)


def test_holomorphic_beyond_the_radius_fails_clearly(case):
    model, x, y, _ = case
    with pytest.raises(DivergenceError, match="analyticity radius"):
        estimate_gradient(model, x, y, "holomorphic", beta=1.0, points=4, **TIGHT)
    est = estimate_gradient(
        model, x, y, "holomorphic", beta=1.0, points=4, nonfinite="skip", **TIGHT
    )
    assert est.skipped
    assert "analyticity radius" in est.reason
    assert all(bool((g == 0).all()) for g in est.grads.values())


def test_holomorphic_two_points_is_aep(case):
    model, x, y, _ = case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        holo = estimate_gradient(model, x, y, "holomorphic", beta=0.02, points=2, **TIGHT)
    aep = estimate_gradient(model, x, y, "aep", beta=0.02, **TIGHT)
    torch.testing.assert_close(holo.adjoint, aep.adjoint)


def test_conjugate_pairs_are_used(case):
    """N = 6 relaxes ⌊N/2⌋ + 1 = 4 phases: the result equals an explicit 6-point sum."""
    model, x, y, _ = case
    est = estimate_gradient(model, x, y, "holomorphic", beta=0.1, points=6, anchor="fixed", **TIGHT)
    import cmath
    import math

    from gradstats.eqprop._estimators._phases import Nudge, run_nudged
    from gradstats.eqprop._problem import prepare
    from gradstats.eqprop._settings import resolve_settings

    s = resolve_settings(
        "holomorphic", {}, torch.float64, beta=0.1, points=6, anchor="fixed", **TIGHT
    )
    problem = prepare(model, x, y)
    betas = [0.1 * cmath.exp(2j * math.pi * k / 6) for k in range(6)]
    nudges = [Nudge(b if abs(b.imag) > 1e-15 else b.real, 1 / 6) for b in betas]
    full, _ = run_nudged(problem, est.state, nudges, correction=True, anchor="fixed", settings=s)
    torch.testing.assert_close(est.adjoint, full)
