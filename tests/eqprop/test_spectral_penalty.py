"""The Jacobian penalties' values and parameter gradients against dense references.

The spectral penalty ½ mean_b σ_max(J_b)² against per-sample SVDs; the Hutchinson penalties'
gradients w.r.t. every transformer parameter against dense Jacobians (third derivatives: torch's
fused ``layer_norm`` gets them wrong, pytorch/pytorch#175754, so the model's ``higher_order``
hook must be in force)."""

import contextlib
import itertools

import pytest
import torch

from gradstats.eqprop import add_penalties, estimate_gradient, penalty_value
from gradstats.eqprop.models import EquilibriumTransformer
from gradstats.eqprop.models._blocks import _PRIMITIVE_NORMS, layer_norm, primitive_norms
from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.testing import dense_jacobian, reference_spectral_penalty

from ._cases import gen, tanh_case


def _transformer(dtype=torch.float64):
    model = EquilibriumTransformer(11, 4, 8, 2, generator=gen(3)).to(dtype)
    with torch.no_grad():  # weights large enough for a non-trivial, well separated spectrum
        for p in model.parameters():
            p.mul_(8.0 if p.dim() == 2 else 1.0)
    x = torch.randint(0, 11, (3, 4), generator=gen(4))
    z = torch.randn(3, 4, 8, generator=gen(5), dtype=dtype)
    return model, x, z


def _case(name):
    """(model, x, z, context): the transformer's penalty is on its relaxation map Φ (as the
    trainer applies it; σ₂/σ₁ ≤ 0.93 for these weights), the tanh model's on its force."""
    if name == "tanh":
        model, x, _ = tanh_case()
        return model, x, 0.3 * torch.randn(5, 8, generator=gen(2)), contextlib.nullcontext
    model, x, z = _transformer()
    return model, x, z, model.relaxation_map


CASES = pytest.mark.parametrize("name", ["tanh", "transformer"])


def _reference(model, x, z, bound=0.0):
    return reference_spectral_penalty(model.force, model.inject(x), z, bound)


def _grads(value, model):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


@CASES
def test_power_iteration_rises_to_the_dense_largest_singular_value(name):
    model, x, z, context = _case(name)
    with context():
        truth = float(_reference(model, x, z).detach())
        values = [
            float(penalty_value(model, x, z, "jacobian", norm="spectral", iterations=k,
                                generator=gen(7)).detach())
            for k in (0, 1, 2, 4, 8, 300)
        ]  # fmt: skip
    # a Rayleigh quotient of JᵀJ under power iteration never falls and never exceeds σ_max²
    assert all(b >= a * (1 - 1e-12) for a, b in itertools.pairwise(values))
    assert max(values) <= truth * (1 + 1e-10)
    assert values[-1] == pytest.approx(truth, rel=1e-9)
    assert values[0] < 0.9 * truth  # a random direction is not the top mode


@CASES
def test_spectral_penalty_gradient_is_the_gradient_of_sigma_max_squared(name):
    model, x, z, context = _case(name)
    with context():
        value = penalty_value(model, x, z, "jacobian", norm="spectral", iterations=300,
                              generator=gen(1))  # fmt: skip
        ours = _grads(value, model)
        ref = _grads(_reference(model, x, z), model)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    assert any(float(g.norm()) > 0 for g in ours)


def test_a_bound_penalises_only_the_excess_of_each_sample():
    model, x, z = _transformer()
    with model.relaxation_map():
        x_in = model.inject(x)
        sigmas = sorted(
            float(torch.linalg.matrix_norm(dense_jacobian(
                lambda s, b=b: model.force(s, x_in[b : b + 1]), z[b : b + 1]), ord=2))
            for b in range(3)
        )  # fmt: skip
        bound = 0.5 * (sigmas[0] + sigmas[1])  # one sample below it, two above
        value = penalty_value(model, x, z, "jacobian", norm="spectral", iterations=300,
                              bound=bound, generator=gen(1))  # fmt: skip
        ref = _reference(model, x, z, bound)
        expected = 0.5 * sum(s * s - bound * bound for s in sigmas[1:]) / 3
        assert float(value.detach()) == pytest.approx(expected, rel=1e-9)
        for a, b in zip(_grads(value, model), _grads(ref, model), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
        above = penalty_value(model, x, z, "jacobian", norm="spectral", bound=1.01 * sigmas[-1],
                              generator=gen(1))  # fmt: skip
        assert float(above.detach()) == 0.0
        assert all(float(g.norm()) == 0 for g in _grads(above, model))


def test_add_penalties_gives_a_satisfied_bound_no_push():
    model, x, y = tanh_case()
    est = estimate_gradient(model, x, y, "aep")
    out = add_penalties(est, model, x, {"jacobian": 0.5}, jac_norm="spectral", jac_bound=10.0)
    assert out.penalties["jacobian"] == {"value": 0.0, "scale": 0.0}
    for name, grad in est.grads.items():
        torch.testing.assert_close(out.grads[name], grad, rtol=0, atol=0)


def test_spectral_penalty_is_the_same_in_float32():
    model64, x, z64 = _transformer(torch.float64)
    model32, _, _ = _transformer(torch.float32)
    with model64.relaxation_map(), model32.relaxation_map():  # converged: the start drops out
        value64 = penalty_value(model64, x, z64, "jacobian", norm="spectral", iterations=300,
                                generator=gen(2))  # fmt: skip
        value32 = penalty_value(model32, x, z64.float(), "jacobian", norm="spectral",
                                iterations=300, generator=gen(2))  # fmt: skip
    assert value32.dtype == torch.float32
    assert float(value32.detach()) == pytest.approx(float(value64.detach()), rel=1e-4)
    for a, b in zip(_grads(value32, model32), _grads(value64, model64), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("norm", ["spectral", "loop"])
def test_shards_draw_the_global_batch(norm):
    model, x, z = _transformer()  # on the force (σ₂/σ₁ ≈ 1: not converged; need not be)
    whole = penalty_value(model, x, z, "jacobian", norm=norm, generator=gen(9))
    parts = []
    for rank in range(3):
        rows = slice(rank, rank + 1)
        parts.append(penalty_value(model, x[rows], z[rows], "jacobian", norm=norm,
                                   generator=gen(9), shard=(rank, 3)))  # fmt: skip
    torch.testing.assert_close(torch.stack(parts).mean(), whole, rtol=1e-12, atol=0)


def test_add_penalties_with_the_spectral_norm():
    model, x, y = tanh_case()
    est = estimate_gradient(model, x, y, "aep")
    out = add_penalties(est, model, x, {"jacobian": 0.5}, jac_norm="spectral", iterations=300,
                        generator=gen(3))  # fmt: skip
    truth = _reference(model, x, est.state)
    assert float(out.penalties["jacobian"]["value"]) == pytest.approx(float(truth), rel=1e-8)
    fro = add_penalties(est, model, x, {"jacobian": 0.5}, generator=gen(3))
    assert float(fro.penalties["jacobian"]["value"]) > 1.5 * float(truth)  # ‖J‖²_F > σ_max²


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"norm": "nuclear"}, ConfigurationError, "norm must be one of 'frobenius', 'spectral'"),
        ({"norm": "spectral", "iterations": -1}, ConfigurationError, "iterations must be an int"),
        ({"norm": "spectral", "iterations": 2.0}, ConfigurationTypeError, "iterations must be an"),
        ({"norm": "spectral", "iterations": True}, ConfigurationTypeError, "got bool"),
        ({"norm": "spectral", "kind": "asymmetry"}, ConfigurationError, "applies to kind='jacob"),
        ({"norm": "spectral", "kind": "residual"}, ConfigurationError, "applies to kind='jacob"),
        ({"bound": 0.5}, ConfigurationError, "bound=0.5 applies to (jac_)?norm='spectral'"),
        ({"iterations": 7}, ConfigurationError, "iterations=7 applies to (jac_)?norm='spectral'"),
        ({"norm": "spectral", "bound": -1.0}, ConfigurationError, "bound must be a finite"),
        ({"norm": "spectral", "bound": float("inf")}, ConfigurationError, "bound must be a finite"),
        ({"norm": "spectral", "bound": True}, ConfigurationTypeError, "bound must be a finite"),
    ],
)  # fmt: skip
def test_bad_spectral_arguments(kwargs, error, match):
    model, x, _ = tanh_case()
    z = torch.zeros(5, 8, dtype=x.dtype)
    with pytest.raises(error, match=match):
        penalty_value(model, x, z, **{"kind": "jacobian", **kwargs})
    est = estimate_gradient(model, x, _, "aep")
    if "kind" not in kwargs:  # the same check in add_penalties, before any penalty is formed
        with pytest.raises(error, match=match):
            add_penalties(est, model, x, {"residual": 0.1, "jacobian": 0.1},
                          jac_norm=kwargs.get("norm", "frobenius"),
                          iterations=kwargs.get("iterations", 3),
                          jac_bound=kwargs.get("bound", 0.0))  # fmt: skip


def _dense_products(model, x, z, v, kind):
    """½ Σ_b ‖M v_b‖²/B with M = J (``jacobian``) or J − Jᵀ (``asymmetry``) of the dense
    whole-batch Jacobian, differentiable w.r.t. the parameters."""
    x_in = model.inject(x)
    with primitive_norms():
        jac = dense_jacobian(lambda state: model.force(state, x_in), z, create_graph=True)
    mat = jac if kind == "jacobian" else jac - jac.T
    w = mat @ v.reshape(-1)
    return 0.5 * (w * w).sum() / z.shape[0]


@pytest.mark.parametrize("kind", ["jacobian", "asymmetry"])
@pytest.mark.parametrize("jvp_mode", ["reverse", "forward"])
def test_hutchinson_penalty_gradients_are_exact_through_layer_norms(kind, jvp_mode):
    model, x, z = _transformer()
    model.jvp_mode = jvp_mode
    v = torch.randn(z.shape, generator=gen(11), dtype=z.dtype)  # the penalty's one draw
    with model.relaxation_map():
        ours = _grads(penalty_value(model, x, z, kind, generator=gen(11)), model)
        ref = _grads(_dense_products(model, x, z, v, kind), model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13, msg=name)
    assert float(ours[names.index("attn.heads.1.query")].norm()) > 0


def test_jacobian_options_without_the_jacobian_penalty_are_rejected():
    model, x, y = tanh_case()
    est = estimate_gradient(model, x, y, "aep")
    for kwargs in ({"jac_norm": "spectral"}, {"jac_norm": "spectral", "jac_bound": 0.1}):
        with pytest.raises(ConfigurationError, match="apply to the 'jacobian' penalty only"):
            add_penalties(est, model, x, {"residual": 0.1}, **kwargs)
    with pytest.raises(ConfigurationError, match="needs a real state"):
        penalty_value(model, x, torch.zeros(5, 8, dtype=torch.complex128), "jacobian",
                      norm="spectral")  # fmt: skip


def test_primitive_norms_compute_the_same_layer_norm():
    norm = torch.nn.LayerNorm(8).double()
    with torch.no_grad():
        norm.weight.normal_(generator=gen(1))
        norm.bias.normal_(generator=gen(2))
    h = torch.randn(3, 5, 8, generator=gen(3), dtype=torch.float64)
    fused = layer_norm(h, norm)
    with primitive_norms():
        primitive = layer_norm(h, norm)
    torch.testing.assert_close(primitive, fused, rtol=1e-13, atol=1e-13)
    assert layer_norm(h, norm).grad_fn.name() == fused.grad_fn.name()  # reset on exit
    assert _PRIMITIVE_NORMS.get() is False
    with primitive_norms():
        with primitive_norms():  # nested: the outer block is still in force after the inner one
            pass
        assert _PRIMITIVE_NORMS.get() is True
    with pytest.raises(KeyError):
        _raise_inside(primitive_norms)
    assert _PRIMITIVE_NORMS.get() is False  # reset after an exception too


def _raise_inside(context):
    with context():
        raise KeyError("inside")
