"""Solvers: stopping, freezing, checks every k steps (host reads only there), Anderson, GMRES."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gradstats.eqprop import Linearization, fixed_point, relax, solve_adjoint
from gradstats.eqprop._problem import free_residual, prepare
from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.testing import newton_fixed_point

from ._cases import gen, tanh_case


class CountHostReads(TorchDispatchMode):
    """Counts device-to-host scalar reads (.item(), .tolist(), bool(t), float(t))."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def case():
    return tanh_case()


@pytest.mark.parametrize("check_every", [5, 25])
def test_host_reads_happen_only_at_checks(case, check_every):
    model, x, _ = case
    problem = prepare(model, x, None)
    with CountHostReads() as counter:
        _, stats = fixed_point(
            problem.force,
            problem.z0,
            step_size=0.5,
            tol=0.0,
            max_steps=100,
            check_every=check_every,
        )
    checks = len(stats.trace_steps)
    assert checks == 100 // check_every + 1
    assert stats.trace_steps == tuple(range(0, 101, check_every))
    assert counter.reads <= 3 * checks  # a constant number of reads per check, none per step


def test_tol_zero_runs_exactly_max_steps(case):
    model, x, _ = case
    z, stats = relax(model, x, tol=0.0, max_steps=7)
    z_manual = model.init_state(x)
    for _ in range(7):
        z_manual = z_manual + 0.5 * model.force(z_manual, x)
    torch.testing.assert_close(z, z_manual, rtol=0, atol=0)
    assert stats.steps.tolist() == [7] * 5
    assert not stats.converged.any()


def test_converged_samples_are_frozen(case):
    model, x, _ = case
    z, stats = relax(model, x, tol=1e-6, check_every=1)
    assert stats.converged.all()
    assert stats.steps.min() < stats.steps.max()  # each sample stopped at its own step
    assert (stats.final_residual <= 1e-6).all()
    torch.testing.assert_close(stats.final_residual, free_residual(prepare(model, x, None), z))
    _z_free, stats_free = relax(model, x, tol=1e-6, check_every=1, freeze=False)
    assert (stats_free.steps == stats_free.steps.max()).all()
    assert (stats_free.final_residual <= stats.final_residual + 1e-15).all()


def test_relax_reaches_the_dense_newton_fixed_point(case):
    model, x, _ = case
    z, stats = relax(model, x, tol=1e-12)
    z_ref = newton_fixed_point(lambda t: model.force(t, x), model.init_state(x))
    torch.testing.assert_close(z, z_ref)
    assert stats.kind == "free"
    assert stats.phase == "free"
    assert "‖F(z)‖/‖z‖" in stats.description


def test_anderson_reaches_the_same_fixed_point_in_fewer_steps(case):
    model, x, _ = case
    z_plain, plain = relax(model, x, tol=1e-11, step_size=0.1, max_steps=5000, check_every=1)
    z_and, accel = relax(
        model, x, tol=1e-11, step_size=0.1, max_steps=5000, anderson=5, check_every=1
    )
    torch.testing.assert_close(z_and, z_plain)
    assert accel.converged.all()
    assert int(accel.steps.max()) < 0.3 * int(plain.steps.max())


def _adjoint_problem(case):
    model, x, y = case
    z, _ = relax(model, x, tol=1e-13, max_steps=5000)
    problem = prepare(model, x, y)
    ell = problem.loss_grad(z)
    return Linearization(problem.force, z), ell, model, x, z


@pytest.mark.parametrize("method", ["richardson", "gmres"])
def test_adjoint_solve_matches_a_dense_solve(case, method):
    lin, ell, model, x, z = _adjoint_problem(case)
    lam, stats = solve_adjoint(lin.vjp, ell, method=method, tol=1e-12, max_steps=5000)
    from gradstats.testing import dense_jacobian

    jac = dense_jacobian(lambda t: model.force(t, x), z)
    lam_ref = -torch.linalg.solve(jac.T, ell.reshape(-1)).reshape(ell.shape)
    torch.testing.assert_close(lam, lam_ref)
    assert stats.kind == "adjoint"
    assert stats.converged.all()
    true = (lin.vjp(lam) + ell).norm(dim=1) / ell.norm(dim=1)
    torch.testing.assert_close(stats.final_residual, true, rtol=1e-3, atol=1e-15)


def test_gmres_needs_far_fewer_vjps_on_a_slow_problem(case):
    lin, ell, *_ = _adjoint_problem(case)
    _, rich = solve_adjoint(lin.vjp, ell, step_size=0.05, tol=1e-10, max_steps=20000)
    _, gmres = solve_adjoint(lin.vjp, ell, method="gmres", tol=1e-10, max_steps=20000)
    assert int(gmres.steps.max()) * 5 < int(rich.steps.max())


def test_solve_adjoint_rejects_an_unknown_method(case):
    lin, ell, *_ = _adjoint_problem(case)
    with pytest.raises(ConfigurationError, match="method must be one of 'richardson', 'gmres'"):
        solve_adjoint(lin.vjp, ell, method="cg")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"step_size": 0.0}, ConfigurationError, "step_size must be a finite float > 0"),
        ({"tol": float("nan")}, ConfigurationError, "tol must be a finite float >= 0"),
        ({"max_steps": 0}, ConfigurationError, "max_steps must be an int >= 1"),
        ({"check_every": 1.5}, ConfigurationTypeError, "check_every must be an int"),
        ({"restart": 0}, ConfigurationError, "restart must be an int >= 1"),
        ({"divergence_factor": 1.0}, ConfigurationError, "divergence_factor must be > 1"),
        ({"stall_checks": -2}, ConfigurationError, "stall_checks must be an int >= 0"),
        ({"lam0": torch.zeros(2)}, ConfigurationError, "lam0 must be a tensor shaped like ell"),
        ({"ell": [0.0]}, ConfigurationTypeError, "ell must be a torch.Tensor; got list"),
    ],
)
def test_solve_adjoint_rejects_bad_options(case, kwargs, error, match):
    lin, ell, *_ = _adjoint_problem(case)
    args = {"ell": ell, **kwargs}
    with pytest.raises(error, match=match):
        solve_adjoint(lin.vjp, **args)


def test_gmres_rejects_a_complex_rhs(case):
    lin, ell, *_ = _adjoint_problem(case)
    with pytest.raises(ConfigurationError, match="method='gmres' solves real adjoints only"):
        solve_adjoint(lin.vjp, torch.complex(ell, ell), method="gmres")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"step_size": -0.5}, ConfigurationError, "step_size must be a finite float > 0"),
        ({"tol": float("inf")}, ConfigurationError, "tol must be a finite float >= 0"),
        ({"anderson": -1}, ConfigurationError, "anderson must be an int >= 0"),
        ({"freeze": "no"}, ConfigurationTypeError, "freeze must be a bool"),
        ({"z0": torch.tensor(1.0)}, ConfigurationTypeError, r"z0 must be a \[B, \.\.\.\]"),
        ({"fn": None}, ConfigurationTypeError, "fn must be callable"),
    ],
)
def test_fixed_point_rejects_bad_options(kwargs, error, match):
    args = {"fn": lambda z: -z, "z0": torch.ones(2, 3), "step_size": 0.5, "tol": 1e-8}
    with pytest.raises(error, match=match):
        fixed_point(**{**args, "max_steps": 10, **kwargs})


def test_summary_is_plain_python(case):
    model, x, _ = case
    _, stats = relax(model, x)
    summary = stats.summary()
    assert summary["phase"] == "free"
    assert summary["converged_fraction"] == 1.0
    assert isinstance(summary["residual_max"], float)


def test_relax_uses_model_defaults_and_a_given_start(case):
    model, x, _ = case
    z, _ = relax(model, x, tol=1e-12)
    z2, stats = relax(model, x, z0=z, tol=1e-10)
    assert int(stats.steps.max()) == 0  # already converged: the first check stops it
    torch.testing.assert_close(z2, z, rtol=0, atol=0)
    with pytest.raises(ConfigurationError, match="complex states are internal"):
        relax(model, x, z0=torch.complex(z, z))
    assert gen(0) is not None
