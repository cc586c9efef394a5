"""The AEP correction is algebraic: the corrected force has Jacobian exactly Jᵀ, never clipped."""

import pytest
import torch

from gradstats.eqprop import Linearization
from gradstats.eqprop._problem import prepare
from gradstats.testing import dense_jacobian, newton_fixed_point

from ._cases import gen, linear_case, tanh_case


def _corrected(problem, anchor):
    lin = Linearization(problem.force, anchor)
    return lambda z: problem.force(z) - lin.antisymmetric(z - anchor), lin


@pytest.mark.parametrize("kappa", [0.25, 4.0])
def test_corrected_linear_force_is_the_transpose_even_where_a_clip_would_bite(kappa):
    model, x, y = linear_case(kappa)
    problem = prepare(model, x, y)
    z_star = newton_fixed_point(problem.force, problem.z0)
    corrected, lin = _corrected(problem, z_star)
    v = 50.0 * torch.randn(z_star.shape, generator=gen(1))
    with torch.no_grad():
        if kappa > 1:  # ‖(A − Aᵀ)v‖ > ‖F‖: where the original scaled the correction down
            assert float(lin.antisymmetric(v).norm()) > float(problem.force(z_star + v).norm())
        torch.testing.assert_close(corrected(z_star + v), v @ model.A)  # (Aᵀv) in row form


def test_corrected_nonlinear_force_has_jacobian_jt_at_the_anchor():
    model, x, y = tanh_case()
    problem = prepare(model, x, y)
    z_star = newton_fixed_point(problem.force, problem.z0)
    _, lin = _corrected(problem, z_star)
    jac = dense_jacobian(problem.force, z_star)
    n = z_star.numel()
    basis = torch.eye(n).reshape(n, *z_star.shape)
    correction = torch.stack([lin.antisymmetric(e).reshape(-1) for e in basis], 1)
    torch.testing.assert_close(correction, jac - jac.T)  # exactly J − Jᵀ, unscaled
    torch.testing.assert_close(jac - correction, jac.T)
    assert (jac - jac.T).norm() > 0.2 * jac.norm()  # far from symmetric: the correction matters


def test_a_scaled_correction_would_not_be_the_transpose():
    """What the original's norm clip did: J − α(J − Jᵀ) ≠ Jᵀ for α < 1."""
    model, x, y = tanh_case()
    problem = prepare(model, x, y)
    z_star = newton_fixed_point(problem.force, problem.z0)
    lin = Linearization(problem.force, z_star)
    jac = dense_jacobian(problem.force, z_star)

    n = z_star.numel()
    basis = torch.eye(n).reshape(n, *z_star.shape)
    correction = torch.stack([lin.antisymmetric(e).reshape(-1) for e in basis], 1)
    assert (jac - 0.5 * correction - jac.T).norm() > 0.1 * jac.norm()
