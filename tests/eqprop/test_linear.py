"""Spec §6, linear family F(z) = Az + Bx, L = ½‖Cz − y‖²: every estimator in closed form."""

import itertools

import pytest
import torch

from gradstats.eqprop import estimate_gradient
from gradstats.testing import LinearClosedForm

from ._cases import TIGHT, cos, linear_case, loglog_slope, rel

KAPPAS = [0.0, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("solver", ["richardson", "gmres"])
@pytest.mark.parametrize("kappa", KAPPAS)
def test_implicit_is_exact(kappa, solver):
    model, x, y = linear_case(kappa)
    cf = LinearClosedForm.of(model, x, y)
    est = estimate_gradient(model, x, y, "implicit", adjoint_solver=solver, **TIGHT)
    torch.testing.assert_close(est.state, cf.z_star)
    torch.testing.assert_close(est.adjoint, cf.lam)
    for name, grad in cf.grads().items():
        torch.testing.assert_close(est.grads[name], grad)


@pytest.mark.parametrize("kappa", KAPPAS)
def test_plain_ep_matches_closed_form(kappa):
    model, x, y = linear_case(kappa)
    cf = LinearClosedForm.of(model, x, y)
    one = estimate_gradient(model, x, y, "ep", beta=0.05, **TIGHT)
    sym = estimate_gradient(model, x, y, "ep_symmetric", beta=0.05, **TIGHT)
    torch.testing.assert_close(one.adjoint, cf.ep(0.05))
    torch.testing.assert_close(sym.adjoint, cf.ep_symmetric(0.05))


@pytest.mark.parametrize("kappa", KAPPAS)
def test_plain_ep_exact_iff_symmetric(kappa):
    model, x, y = linear_case(kappa)
    cf = LinearClosedForm.of(model, x, y)
    est = estimate_gradient(model, x, y, "ep_symmetric", beta=1e-3, **TIGHT)
    c = cos(est.adjoint, cf.lam)
    assert c == pytest.approx(cos(cf.ep_limit(), cf.lam), abs=1e-5)
    if kappa == 0:
        assert rel(est.adjoint, cf.lam) < 1e-5
    else:  # biased by the antisymmetric part, however small β is
        assert c < 0.999
        assert rel(est.adjoint, cf.lam) > 0.02


@pytest.mark.parametrize("kappa", [0.5, 1.0])
def test_aep_matches_closed_form_fixed_anchor(kappa):
    model, x, y = linear_case(kappa)
    cf = LinearClosedForm.of(model, x, y)
    est = estimate_gradient(model, x, y, "aep", beta=0.1, anchor="fixed", **TIGHT)
    torch.testing.assert_close(est.adjoint, cf.aep(0.1))
    for name, grad in cf.grads(cf.aep(0.1)).items():
        torch.testing.assert_close(est.grads[name], grad)


@pytest.mark.parametrize("anchor", ["fixed", "tracking"])
def test_aep_error_is_second_order_in_beta(anchor):
    model, x, y = linear_case(1.0)
    cf = LinearClosedForm.of(model, x, y)
    betas = [0.2, 0.1, 0.05, 0.025]
    errors = [
        rel(estimate_gradient(model, x, y, "aep", beta=b, anchor=anchor, **TIGHT).adjoint, cf.lam)
        for b in betas
    ]
    assert loglog_slope(betas, errors) == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("points", [2, 3, 4, 6])
def test_holomorphic_aep_closed_form(points):
    model, x, y = linear_case(0.5)
    cf = LinearClosedForm.of(model, x, y)
    r = 0.4 * cf.analyticity_radius()  # (r/R)^N stays below the aliasing warning level
    est = estimate_gradient(
        model, x, y, "holomorphic", beta=r, points=points, anchor="fixed", **TIGHT
    )
    torch.testing.assert_close(est.adjoint, cf.holomorphic_aep(r, points))


def test_holomorphic_plain_closed_form():
    model, x, y = linear_case(0.5)
    cf = LinearClosedForm.of(model, x, y)
    r = 0.5 * cf.analyticity_radius()
    est = estimate_gradient(model, x, y, "holomorphic", beta=r, points=5, correction=False, **TIGHT)
    torch.testing.assert_close(est.adjoint, cf.holomorphic_ep(r, 5))


@pytest.mark.parametrize("anchor", ["fixed", "tracking"])
def test_holomorphic_error_shrinks_geometrically_in_points(anchor):
    model, x, y = linear_case(0.5)
    cf = LinearClosedForm.of(model, x, y)
    r = 0.5 * cf.analyticity_radius()
    ns = [4, 6, 8, 10]
    errors = []
    for n in ns:
        est = estimate_gradient(
            model, x, y, "holomorphic", beta=r, points=n, anchor=anchor, **TIGHT
        )
        errors.append(rel(est.adjoint, cf.lam))
        # the library's own estimate of r/R from the circle's Fourier coefficients
        assert float(est.stats["nudged"].extra["radius_ratio"].max()) == pytest.approx(
            0.5, abs=0.05
        )
    rates = [(e2 / e1) ** (1 / 2) for e1, e2 in itertools.pairwise(errors)]
    for rate in rates:  # error ∝ (r/R)^N with r/R = 0.5
        assert rate == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("beta", [0.1, 0.01])
@pytest.mark.parametrize("t2", [3, 10, 30])
def test_finite_t2_closed_form(t2, beta):
    model, x, y = linear_case(0.5)
    cf = LinearClosedForm.of(model, x, y)
    est = estimate_gradient(
        model,
        x,
        y,
        "aep",
        beta=beta,
        anchor="fixed",
        tol=1e-13,
        max_steps=20000,
        tol_adjoint=0.0,
        max_steps_adjoint=t2,
    )
    torch.testing.assert_close(est.adjoint, cf.aep_finite(beta, 0.5, t2))
    assert not est.stats["nudged"].converged.any()


def test_finite_t2_error_does_not_depend_on_beta():
    """Truncation, not the nudge: the T2 error is the same for β = 0.02 and β = 0.0002."""
    model, x, y = linear_case(0.5)
    cf = LinearClosedForm.of(model, x, y)
    limit = cf.truncation_limit(0.5, 8)
    errors = []
    for beta in (0.02, 0.002, 0.0002):
        est = estimate_gradient(
            model,
            x,
            y,
            "aep",
            beta=beta,
            anchor="fixed",
            tol=1e-13,
            max_steps=20000,
            tol_adjoint=0.0,
            max_steps_adjoint=8,
        )
        errors.append(rel(est.adjoint, cf.lam))
        assert rel(est.adjoint, limit) < 2 * beta**2
    assert errors[0] > 0.01
    assert max(errors) / min(errors) < 1.05


@pytest.mark.parametrize("t2", [2, 5, 12])
def test_contrast_residual_is_the_adjoint_residual(t2):
    """r_a, computed from the phase forces only, equals ‖Aᵀa + ℓ‖/‖ℓ‖ up to O(β²)."""
    model, x, y = linear_case(1.0)
    cf = LinearClosedForm.of(model, x, y)
    beta = 1e-3
    est = estimate_gradient(
        model,
        x,
        y,
        "aep",
        beta=beta,
        anchor="fixed",
        tol=1e-13,
        max_steps=20000,
        tol_adjoint=0.0,
        max_steps_adjoint=t2,
    )
    stats = est.stats["nudged"]
    assert stats.kind == "contrast"
    true = (est.adjoint @ cf.A + cf.ell).norm(dim=1) / cf.ell.norm(dim=1)
    assert float(true.min()) > 1e-5  # not converged: the residual has something to say
    # they differ by H(δ₊ + δ₋)/2 = O(β²) (relative to ‖ℓ‖)
    torch.testing.assert_close(stats.final_residual, true, rtol=0, atol=10 * beta**2)
