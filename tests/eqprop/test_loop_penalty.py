"""The ``loop`` Jacobian penalty ½ mean_b ‖J_b²‖²_F: exact against dense products, zero on a
layered block without feedback (its map's Jacobian is nilpotent), the loop gain with it."""

import pytest
import torch

from gradstats.eqprop import JACOBIAN_NORMS, add_penalties, estimate_gradient, penalty_value
from gradstats.eqprop.models._blocks import primitive_norms
from gradstats.errors import ConfigurationError
from gradstats.testing import dense_jacobian

from ._cases import gen, tanh_case
from .test_layered import layered


def _state(model, idx, seed=5):
    shape = (*idx.shape, 2 * model.d_model)
    return 0.5 * torch.randn(shape, generator=gen(seed), dtype=torch.float64)


def _grads(value, model):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _dense_loop(model, idx, z, v=None):
    """½ Σ_b ‖M_b² v_b‖²/B (``v`` None: ½ Σ_b ‖M_b²‖²_F/B) with M_b the dense Jacobian of the
    map Φ for sample b alone, differentiable w.r.t. the parameters."""
    x_in = model.inject(idx)
    total = z.new_zeros(())
    for b in range(z.shape[0]):
        with primitive_norms():
            jac = dense_jacobian(
                lambda s, b=b: model.force(s, x_in[b : b + 1]), z[b : b + 1], create_graph=True
            )
        square = jac @ jac
        if v is None:
            total = total + (square * square).sum()
        else:
            w = square @ v[b].reshape(-1)
            total = total + (w * w).sum()
    return 0.5 * total / z.shape[0]


def test_loop_is_a_jacobian_norm():
    assert "loop" in JACOBIAN_NORMS


@pytest.mark.parametrize("jvp_mode", ["reverse", "forward"])
def test_value_and_gradient_equal_dense_two_step_products(jvp_mode):
    model, idx, _ = layered(feedback=0.5, damping=1.0, std=0.5)
    model.jvp_mode = jvp_mode
    z = _state(model, idx)
    v = torch.randn(z.shape, generator=gen(11), dtype=z.dtype)  # the penalty's one draw
    with model.relaxation_map():
        value = penalty_value(model, idx, z, "jacobian", norm="loop", generator=gen(11))
        ref = _dense_loop(model, idx, z, v)
        torch.testing.assert_close(value, ref, rtol=1e-10, atol=0)
        ours, theirs = _grads(value, model), _grads(ref, model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13, msg=name)
    assert float(ours[names.index("attn.heads.0.query")].norm()) > 0


def test_hutchinson_mean_tends_to_the_frobenius_norm_of_the_squared_jacobian():
    model, idx, _ = layered(feedback=1.0, damping=1.0, std=0.5)
    z = _state(model, idx)
    with model.relaxation_map(), torch.no_grad():
        truth = float(_dense_loop(model, idx, z))
        value = float(penalty_value(model, idx, z, "jacobian", norm="loop", probes=400,
                                    generator=gen(3)))  # fmt: skip
    assert truth > 0
    assert abs(value / truth - 1) < 0.1  # 400 probes: relative sd ~ (2/(400·n_eff))^½


@pytest.mark.parametrize("damping", [0.0, 1.0])
def test_without_feedback_the_loop_penalty_vanishes_but_frobenius_does_not(damping):
    model, idx, _ = layered(feedback=0.0, damping=damping, std=0.5)
    z = _state(model, idx)
    with model.relaxation_map():
        loop = penalty_value(model, idx, z, "jacobian", norm="loop", generator=gen(1))
        frob = penalty_value(model, idx, z, "jacobian", generator=gen(1))
        grads = _grads(loop, model)
    assert float(loop) < 1e-25
    assert max(float(g.abs().max()) for g in grads) < 1e-12
    assert float(frob) > 1e-2  # the feed-forward block I + ∂FFN of the map
    model.feedback = 0.5  # the same weights with feedback: the loop gain is penalised
    with model.relaxation_map():
        assert float(penalty_value(model, idx, z, "jacobian", norm="loop", generator=gen(1))) > 1e-4


def test_add_penalties_with_the_loop_norm_scales_to_the_task_gradient():
    model, idx, y = layered(feedback=0.5, damping=1.0)
    est = estimate_gradient(model, idx, y, "aep", beta=0.05)
    with model.relaxation_map():
        out = add_penalties(est, model, idx, {"jacobian": 0.2}, jac_norm="loop", generator=gen(0))
    record = out.penalties["jacobian"]
    assert float(record["value"]) > 0
    assert float(record["scale"]) > 0
    diff = {n: out.grads[n] - est.grads[n] for n in est.grads}
    pen_norm = torch.linalg.vector_norm(torch.stack([d.norm() for d in diff.values()]))
    task_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in est.grads.values()]))
    torch.testing.assert_close(pen_norm, 0.2 * task_norm, rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "asymmetry"}, "norm='loop' applies to kind='jacobian'"),
        ({"kind": "residual"}, "norm='loop' applies to kind='jacobian'"),
        ({"bound": 0.5}, "bound=0.5 applies to norm='spectral'"),
        ({"iterations": 5}, "iterations=5 applies to norm='spectral'"),
    ],
)
def test_bad_loop_arguments(kwargs, match):
    model, x, _ = tanh_case()
    z = torch.zeros(5, 8, dtype=x.dtype)
    with pytest.raises(ConfigurationError, match=match):
        penalty_value(model, x, z, **{"kind": "jacobian", "norm": "loop", **kwargs})


def test_the_loop_norm_needs_a_real_state():
    model, x, _ = tanh_case()
    z = torch.zeros(5, 8, dtype=torch.complex128)
    with pytest.raises(ConfigurationError, match="norm='loop' needs a real state"):
        penalty_value(model, x, z, "jacobian", norm="loop")
