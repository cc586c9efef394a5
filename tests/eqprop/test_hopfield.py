"""Spec §6, Hopfield energy model (J symmetric): AEP = symmetric EP, slopes 1 and 2, BPTT."""

import itertools

import pytest
import torch

from gradstats.eqprop import estimate_gradient, relax
from gradstats.testing import (
    dense_jacobian,
    finite_difference_gradient,
    reference_implicit_gradient,
)

from ._cases import TIGHT, flat, float64, hopfield_case, loglog_slope, rel


@pytest.fixture(scope="module")
def case():
    with float64():
        model, x, y = hopfield_case()
        return model, x, y, reference_implicit_gradient(model, x, y)


def test_jacobian_is_symmetric_and_force_is_minus_energy_gradient(case):
    model, x, _, ref = case
    jac = ref["jacobian"]
    torch.testing.assert_close(jac, jac.T)
    z = ref["state"] + 0.3
    zz = z.clone().requires_grad_(True)
    (grad_e,) = torch.autograd.grad(model.energy(zz, x), zz)
    torch.testing.assert_close(model.force(z, x), -grad_e)


def test_implicit_matches_dense_reference(case):
    model, x, y, ref = case
    est = estimate_gradient(model, x, y, "implicit", **TIGHT)
    torch.testing.assert_close(est.adjoint, ref["adjoint"])
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(est.grads[name], grad)


@pytest.mark.parametrize("anchor", ["fixed", "tracking"])
def test_aep_equals_symmetric_ep(case, anchor):
    model, x, y, _ = case
    aep = estimate_gradient(model, x, y, "aep", beta=0.05, anchor=anchor, **TIGHT)
    sym = estimate_gradient(model, x, y, "ep_symmetric", beta=0.05, **TIGHT)
    torch.testing.assert_close(aep.adjoint, sym.adjoint)
    torch.testing.assert_close(flat(aep.grads), flat(sym.grads))


@pytest.mark.parametrize(("method", "slope"), [("ep", 1.0), ("ep_symmetric", 2.0), ("aep", 2.0)])
def test_error_slope_in_beta(case, method, slope):
    model, x, y, ref = case
    betas = [0.08, 0.04, 0.02, 0.01]
    errors = [
        rel(flat(estimate_gradient(model, x, y, method, beta=b, **TIGHT).grads), flat(ref["grads"]))
        for b in betas
    ]
    assert loglog_slope(betas, errors) == pytest.approx(slope, abs=0.1)


@pytest.mark.parametrize("steps", [3, 8])
def test_bptt_is_the_exact_gradient_of_the_unrolled_objective(steps):
    model, x, y = hopfield_case(n=4, m=3, p=2, batch=2)
    est = estimate_gradient(model, x, y, "bptt", steps=steps, step_size=0.5)

    def objective():
        z = model.init_state(x)
        for _ in range(steps):
            z = z + 0.5 * model.force(z, x)
        return model.loss(z, y)

    fd = finite_difference_gradient(objective, dict(model.named_parameters()))
    for name, grad in fd.items():
        torch.testing.assert_close(est.grads[name], grad, rtol=1e-6, atol=1e-9)  # FD: O(h²)


def test_bptt_converges_to_implicit_as_t1_grows(case):
    model, x, y, ref = case
    t1s = [5, 10, 20, 40]
    errors = [
        rel(flat(estimate_gradient(model, x, y, "bptt", steps=t).grads), flat(ref["grads"]))
        for t in t1s
    ]
    assert all(b < 0.5 * a for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-4


def test_relax_reaches_the_newton_fixed_point(case):
    model, x, _, ref = case
    z, stats = relax(model, x, tol=1e-13, max_steps=20000)
    torch.testing.assert_close(z, ref["state"])
    assert stats.converged.all()
    jac = dense_jacobian(lambda t: model.force(t, x), z)
    assert torch.linalg.eigvalsh(jac).max() < 0  # a stable fixed point
