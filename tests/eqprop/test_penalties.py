"""Penalties act on the active force, with the estimate's noise, scaled from the pure task norm."""

import pytest
import torch

from gradstats.eqprop import add_penalties, estimate_gradient, free_tolerance, penalty_value
from gradstats.eqprop.models import TanhModel
from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.testing import dense_jacobian

from ._cases import NoisyTanh, gen, hopfield_case, tanh_case


class TwoModes(TanhModel):
    """``mode`` switches the dynamics, as the transformer's thick/real/energy modes do."""

    def __init__(self, base, mode):
        super().__init__(base.W.data, base.U.data, base.b.data, base.C.data)
        self.mode = mode

    def force(self, z, x):
        if self.mode == "thick":
            return super().force(z, x)
        return -z + torch.tanh(z @ self.W.T) + x @ self.U.T + self.b


def _grads(value, model):
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g
        for n, p, g in zip(names, params, grads, strict=True)
    }


@pytest.mark.parametrize("mode", ["thick", "real"])
def test_residual_penalty_uses_the_active_force(mode):
    base, x, _y = tanh_case()
    model = TwoModes(base, mode)
    z = 0.3 * torch.randn(5, 8, generator=gen(1))
    ours = penalty_value(model, x, z, "residual")
    f = model.force(z, x)
    torch.testing.assert_close(ours, 0.5 * (f * f).sum() / 5)
    other = TwoModes(base, "real" if mode == "thick" else "thick")
    assert abs(float((ours - penalty_value(other, x, z, "residual")).detach())) > 1e-3


@pytest.mark.parametrize(("kind", "exact"), [("jacobian", "frobenius"), ("asymmetry", "antisym")])
def test_hutchinson_penalties_converge_to_the_dense_value(kind, exact):
    base, x, _ = tanh_case()
    z = 0.3 * torch.randn(5, 8, generator=gen(2))
    jac = dense_jacobian(lambda t: base.force(t, x), z)
    mat = jac if exact == "frobenius" else jac - jac.T
    truth = 0.5 * (mat * mat).sum() / 5
    errors = []
    for probes in (4, 64, 1024):
        value = penalty_value(base, x, z, kind, probes=probes, generator=gen(probes))
        errors.append(abs(float(value.detach() - truth)) / float(truth))
    assert errors[-1] < 0.1
    assert errors[-1] < errors[0]


def test_asymmetry_penalty_is_differentiable_and_vanishes_for_an_energy_model():
    base, x, _ = tanh_case()
    hopfield, hx, _ = hopfield_case()
    z = 0.3 * torch.randn(5, 8, generator=gen(3))
    value = penalty_value(hopfield, hx, z, "asymmetry", probes=4, generator=gen(0))
    assert float(value.detach()) < 1e-25
    grads = _grads(penalty_value(base, x, z, "asymmetry", probes=4, generator=gen(0)), base)
    assert grads["W"].norm() > 0


def test_penalties_use_the_estimates_noise():
    base, x, y = tanh_case()
    model = NoisyTanh(base, sigma=0.5)
    est = estimate_gradient(model, x, y, "aep", generator=gen(4))
    total = add_penalties(est, model, x, {"residual": 1.0}, relative=False, tol=0.0)
    f = model.force(est.state, x, noise=est.noise)
    expected = _grads(0.5 * (f * f).sum() / 5, model)
    for name, grad in total.grads.items():
        torch.testing.assert_close(grad, est.grads[name] + expected[name])


def test_relative_scale_comes_from_the_pure_task_gradient():
    model, x, y = tanh_case()
    est = estimate_gradient(model, x, y, "aep")
    joint = add_penalties(
        est, model, x, {"residual": 0.1, "asymmetry": 0.2}, generator=gen(5), tol=0.0
    )
    chained = add_penalties(
        add_penalties(est, model, x, {"residual": 0.1}, tol=0.0),
        model,
        x,
        {"asymmetry": 0.2},
        generator=gen(5),
    )
    task = torch.cat([g.reshape(-1) for g in est.grads.values()]).norm()
    for name in ("residual", "asymmetry"):
        torch.testing.assert_close(joint.penalties[name]["scale"], chained.penalties[name]["scale"])
    for name, grad in joint.grads.items():
        torch.testing.assert_close(grad, chained.grads[name])
    assert joint.task_grads is not None
    for name, grad in est.grads.items():
        torch.testing.assert_close(joint.task_grads[name], grad, rtol=0, atol=0)
    # a relative weight w puts the penalty gradient's norm at w‖g_task‖
    residual_only = add_penalties(est, model, x, {"residual": 0.1}, tol=0.0)
    delta = torch.cat([(residual_only.grads[n] - est.grads[n]).reshape(-1) for n in est.grads])
    torch.testing.assert_close(delta.norm(), 0.1 * task)


def _hinge_reference(model, x, z, tol):
    """½ Σ_b max(0, ‖F(z_b)‖² − tol²‖z_b‖²) / B, one sample at a time."""
    total = z.new_zeros(())
    for b in range(z.shape[0]):
        f = model.force(z[b : b + 1], x[b : b + 1])
        excess = (f * f).sum() - tol**2 * (z[b] * z[b]).sum()
        total = total + torch.clamp(excess, min=0.0)
    return 0.5 * total / z.shape[0]


def test_residual_penalty_counts_only_the_excess_over_the_tolerance():
    model, x, _ = tanh_case()
    z = 0.3 * torch.randn(5, 8, generator=gen(6))
    with torch.no_grad():
        relative = model.force(z, x).norm(dim=1) / z.norm(dim=1)
    tol = float(relative.median())  # some samples below the tolerance, some above
    assert bool((relative < tol).any())
    assert bool((relative > tol).any())
    ours = penalty_value(model, x, z, "residual", tol=tol)
    truth = _hinge_reference(model, x, z, tol)
    torch.testing.assert_close(ours, truth, rtol=1e-12, atol=0)
    mine, theirs = _grads(ours, model), _grads(truth, model)
    for name, grad in mine.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-12, atol=1e-15)
    plain = penalty_value(model, x, z, "residual", tol=0.0)
    assert float(ours.detach()) < float(plain.detach())
    above = float(relative.max()) * 1.01  # every sample converged: exactly nothing
    assert float(penalty_value(model, x, z, "residual", tol=above).detach()) == 0.0


@pytest.mark.parametrize("method", ["aep", "bptt"])
def test_converged_estimate_gets_no_residual_push(method):
    """At a converged state the relative residual penalty adds exactly nothing (scale 0, no
    NaN); before, its vanishing gradient was scaled up to the task gradient's norm."""
    model, x, y = tanh_case()
    est = estimate_gradient(model, x, y, method)
    tol = free_tolerance(est)
    assert tol > 0
    total = add_penalties(est, model, x, {"residual": 1.0})
    assert float(total.penalties["residual"]["scale"]) == 0.0
    assert float(total.penalties["residual"]["value"]) == 0.0
    for name, grad in total.grads.items():
        torch.testing.assert_close(grad, est.grads[name], rtol=0, atol=0)
    plain = add_penalties(est, model, x, {"residual": 1.0}, tol=0.0)
    assert float(plain.penalties["residual"]["scale"]) > 1e3  # the amplification it removes


def test_bad_penalty_arguments():
    model, x, y = tanh_case()
    est = estimate_gradient(model, x, y, "aep")
    with pytest.raises(ConfigurationError, match="penalty must be one of"):
        add_penalties(est, model, x, {"jacobian_norm": 0.1})
    once = add_penalties(est, model, x, {"residual": 0.1})
    with pytest.raises(ConfigurationError, match="already added"):
        add_penalties(once, model, x, {"residual": 0.1})
    with pytest.raises(ConfigurationError, match="tol must be a finite float >= 0"):
        add_penalties(est, model, x, {"residual": 0.1}, tol=-1.0)


@pytest.mark.parametrize(
    ("weights", "kwargs", "error", "match"),
    [
        ({"residual": -1.0}, {}, ConfigurationError, r"weights\['residual'\] must be a finite"),
        ({"residual": float("inf")}, {}, ConfigurationError, "must be a finite float >= 0"),
        ({"residual": float("nan")}, {}, ConfigurationError, "must be a finite float >= 0"),
        ({"residual": True}, {}, ConfigurationTypeError, "must be a finite float >= 0; got bool"),
        ([("residual", 0.1)], {}, ConfigurationTypeError, "weights must be a mapping"),
        ({"residual": 0.1}, {"probes": 0}, ConfigurationError, "probes must be an int >= 1"),
    ],
)
def test_bad_penalty_weights_leave_the_estimate_unchanged(weights, kwargs, error, match):
    model, x, y = tanh_case()
    est = estimate_gradient(model, x, y, "aep")
    before = {n: g.clone() for n, g in est.grads.items()}
    with pytest.raises(error, match=match):
        add_penalties(est, model, x, weights, **kwargs)
    assert est.penalties == {}
    assert est.task_grads is None
    for name, grad in est.grads.items():
        torch.testing.assert_close(grad, before[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "frobenius"}, "kind must be one of"),
        ({"probes": 0}, "probes must be an int >= 1"),
        ({"shard": (2, 2)}, r"shard must be \(rank, world\) with 0 <= rank < world"),
        ({"shard": [0, 2]}, r"shard must be a tuple \(rank, world\) of ints; got \[0, 2\]"),
        ({"shard": (0.0, 2)}, r"shard must be a tuple \(rank, world\) of ints"),
        ({"tol": -1e-3}, "tol must be a finite float >= 0"),
        ({"tol": float("nan")}, "tol must be a finite float >= 0"),
    ],
)
def test_bad_penalty_value_arguments(kwargs, match):
    model, x, _ = tanh_case()
    z = torch.zeros(5, 8, dtype=x.dtype)
    with pytest.raises(ConfigurationError, match=match):
        penalty_value(model, x, z, **{"kind": "residual", **kwargs})
