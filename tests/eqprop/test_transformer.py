"""The equilibrium transformer: holomorphic extension, modes, groups, clamp path, fidelity."""

import pytest
import torch

from gradstats.eqprop import estimate_gradient, probe
from gradstats.eqprop.models import BackpropTransformer, EquilibriumTransformer
from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.testing import dense_jacobian, reference_implicit_gradient

from ._cases import cos, flat, gen

LONG = {"max_steps": 5000, "max_steps_adjoint": 5000}


def tiny(mode="thick", seed=0, dtype=torch.float64, **kw):
    """A small model with weights strong enough that attention and FFN matter."""
    std = 0.03 if mode == "energy" else 0.3  # the Hopfield FFN is positive feedback: keep it weak
    model = EquilibriumTransformer(
        7, 5, 8, 2, attn_mode=mode, init_std=std, generator=gen(seed), **kw
    ).to(dtype)
    g = gen(seed + 1)
    idx = torch.tensor([[1, 3, 3, 0, 1], [2, 2, 6, 1, 3]])  # repeated tokens
    y = torch.randint(7, (2, 5), generator=g)
    return model, idx, y


def state(model, idx, seed=2):
    x_in = model.inject(idx).detach()
    noise = 0.3 * torch.randn(x_in.shape, generator=gen(seed), dtype=x_in.dtype)
    return model.init_state(x_in) + noise, x_in


def test_holomorphic_force_equals_the_real_force_on_the_real_axis():
    model, idx, _ = tiny()
    z, x_in = state(model, idx)
    with torch.no_grad():
        real = model.force(z, x_in)
        extended = model.force(z.to(torch.complex128), x_in)
    torch.testing.assert_close(extended.real, real)
    torch.testing.assert_close(extended.imag, torch.zeros_like(real))


def ignoring(y):
    """``y`` with two targets set to the ignore index −100."""
    y = y.clone()
    y[0, 2] = y[1, 4] = -100
    return y


@pytest.mark.parametrize("ignored", [False, True])
def test_holomorphic_loss_equals_the_real_loss_on_the_real_axis(ignored):
    model, idx, y = tiny()
    y = ignoring(y) if ignored else y
    z, _ = state(model, idx)
    with torch.no_grad():
        extended = model.loss(z.to(torch.complex128), y)
        real = model.loss(z, y)
    torch.testing.assert_close(extended.real, real)
    torch.testing.assert_close(extended.imag, torch.zeros_like(real))


def test_holomorphic_gradient_matches_the_implicit_gradient_with_ignored_targets():
    """Targets −100 drop out of both losses: the circle contrast still estimates ∇L."""
    _, idx, y = tiny()
    model = EquilibriumTransformer(7, 5, 8, 2, init_std=0.15, generator=gen(0))
    y = ignoring(y)
    kw = {"tol": 1e-12, "tol_adjoint": 1e-10, **LONG}
    ref = estimate_gradient(model, idx, y, "implicit", adjoint_solver="gmres", **kw)
    est = estimate_gradient(model, idx, y, "holomorphic", beta=0.05, **kw)
    assert cos(flat(est.grads), flat(ref.grads)) > 1 - 1e-8
    norm = flat(est.grads).norm() / flat(ref.grads).norm()
    assert float(norm) == pytest.approx(1.0, rel=1e-4)


def test_complex_step_derivative_is_the_real_jvp():
    """Analyticity: Im F(z + ihv)/h = Jv for a tiny h (no subtraction, so no cancellation)."""
    model, idx, _ = tiny()
    z, x_in = state(model, idx)
    v = torch.randn(z.shape, generator=gen(5), dtype=z.dtype)
    h = 1e-30
    with torch.no_grad():
        step = model.force(torch.complex(z, h * v), x_in).imag / h
    _, jv = torch.func.jvp(lambda s: model.force(s, x_in), (z,), (v,))
    torch.testing.assert_close(step, jv)


@pytest.mark.parametrize("mode", ["real", "energy"])
def test_holomorphic_is_rejected_by_name_in_real_modes(mode):
    model, idx, y = tiny(mode)
    with pytest.raises(
        ConfigurationError, match=rf"holomorphic.*EquilibriumTransformer\(mode='{mode}'\)"
    ):
        estimate_gradient(model, idx, y, "holomorphic")
    assert "holomorphic" not in model.supported_methods()


def test_energy_mode_ffn_force_is_minus_the_gradient_of_its_energy():
    model, idx, _ = tiny("energy")
    z, _ = state(model, idx)
    ffn = model.ffn

    def energy(s):
        h = torch.nn.functional.layer_norm(s, s.shape[-1:], ffn.norm.weight, ffn.norm.bias)
        return -0.5 * (torch.relu(h @ ffn.up.weight.T + ffn.up.bias) ** 2).sum()

    zz = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(zz), zz)
    torch.testing.assert_close(ffn.energy_force(z), -grad)
    jac = dense_jacobian(ffn.energy_force, z[:1])
    torch.testing.assert_close(jac, jac.T)  # conservative: symmetric Jacobian


@pytest.mark.parametrize("mode", ["thick", "real", "energy"])
def test_implicit_gradient_matches_dense_reference_including_the_clamp_path(mode):
    model, idx, y = tiny(mode)
    ref = reference_implicit_gradient(model, idx, y)
    est = estimate_gradient(
        model, idx, y, "implicit", tol=1e-13, tol_adjoint=1e-12, max_steps=5000,
        adjoint_solver="gmres",
    )  # fmt: skip
    for name in ("embed.token", "embed.position", "attn.heads.1.query", "readout.proj"):
        torch.testing.assert_close(est.grads[name], ref["grads"][name])


@pytest.mark.parametrize("mode", ["thick", "real", "energy"])
def test_aep_matches_the_implicit_gradient_in_every_mode(mode):
    model, idx, y = tiny(mode)
    ref = reference_implicit_gradient(model, idx, y)
    est = estimate_gradient(model, idx, y, "aep", beta=1e-3, tol=1e-12, tol_adjoint=1e-9, **LONG)
    assert cos(flat(est.grads), flat(ref["grads"])) > 1 - 1e-8


def test_forward_backpropagates_the_exact_implicit_gradient():
    model, idx, y = tiny()
    model.zero_grad()
    logits = model(idx, tol=1e-13, max_steps=5000)
    torch.nn.functional.cross_entropy(
        logits.reshape(-1, 7), y.reshape(-1), reduction="sum"
    ).backward()
    ref = reference_implicit_gradient(model, idx, y)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref["grads"][name], msg=name)


def test_parameter_groups_cover_every_parameter_and_split_heads():
    model = EquilibriumTransformer(65, 32, 64, 4)
    groups = model.parameter_groups()
    names = {n for n, _ in model.named_parameters()}
    parts = ("embed", "attn", "ffn", "ln", "readout")
    assert set().union(*(set(groups[p]) for p in parts)) == names
    assert sum(len(groups[p]) for p in parts) == len(names)  # the parts are disjoint
    heads = [groups[f"attn.head{h}"] for h in range(4)]
    assert set().union(*map(set, heads)) == set(groups["attn"])
    assert groups["attn.head2"] == [
        f"attn.heads.2.{n}" for n in ("query", "key", "value", "out", "q_norm", "k_norm")
    ]


def test_force_noise_is_drawn_once_and_never_inside_the_force():
    model, idx, y = tiny(force_noise=0.2)
    x_in = model.inject(idx).detach()
    a = model.sample_noise(x_in, gen(3))
    b = model.sample_noise(x_in, gen(3))
    torch.testing.assert_close(a["attn"], b["attn"])
    est = estimate_gradient(
        model, idx, y, "aep", generator=gen(3), tol=1e-12, tol_adjoint=1e-9, **LONG
    )
    ref = reference_implicit_gradient(model, idx, y, noise=est.noise)
    assert cos(flat(est.grads), flat(ref["grads"])) > 0.999999


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attn_mode": "mono"}, "attn_mode must be one of"),
        ({"n_heads": 3}, "divisible by n_heads"),
        ({"damping": -1.0}, "damping must be a finite float >= 0"),
        ({"damping": float("nan")}, "damping must be a finite float >= 0"),
        ({"force_noise": float("inf")}, "force_noise must be a finite float >= 0"),
        ({"init_std": 0.0}, "init_std must be a finite float > 0"),
        ({"embed_std": "1"}, "embed_std must be a finite float > 0; got str"),
        ({"qk_norm": 1}, "qk_norm must be a bool"),
        ({"ffn_mult": 0}, "ffn_mult must be an int >= 1"),
        ({"vocab_size": 2.0}, "vocab_size must be an int"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = {"vocab_size": 7, "block_size": 5, "d_model": 8, "n_heads": 2, **kwargs}
    with pytest.raises(ConfigurationError, match=match):
        EquilibriumTransformer(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_heads": 3}, "divisible by n_heads"),
        ({"n_layers": 0}, "n_layers must be an int >= 1"),
        ({"qk_norm": "yes"}, "qk_norm must be a bool"),
        ({"init_std": -0.1}, "init_std must be a finite float > 0"),
    ],
)
def test_bad_baseline_arguments(kwargs, match):
    args = {"vocab_size": 7, "block_size": 5, "d_model": 8, "n_heads": 2, **kwargs}
    with pytest.raises(ConfigurationError, match=match):
        BackpropTransformer(**args)


@pytest.mark.parametrize("model_class", [EquilibriumTransformer, BackpropTransformer])
def test_sequence_longer_than_block_size_is_rejected(model_class):
    model = model_class(7, 5, 8, 2)
    with pytest.raises(ConfigurationError, match="exceeds block_size=5"):
        model(torch.zeros(1, 6, dtype=torch.int64))


@pytest.mark.parametrize(
    ("idx", "match"),
    [
        (torch.zeros(1, 3), "integer tensor of token ids.*got a torch.float32 tensor"),
        (torch.zeros(3, dtype=torch.int64), r"shaped \[B, T\]; got a torch.int64 tensor of shape"),
        ([[1, 2]], "got list"),
    ],
)
def test_token_ids_must_be_an_integer_matrix(idx, match):
    model, _, _ = tiny()
    with pytest.raises(ConfigurationTypeError, match=match):
        model.inject(idx)


def test_relaxation_map_rejects_a_bad_step_size():
    model, _, _ = tiny()
    with (
        pytest.raises(ConfigurationError, match="step_size must be a finite float > 0"),
        model.relaxation_map(-1.0),
    ):
        pass


def test_complex_state_outside_thick_mode_is_rejected():
    model, idx, _ = tiny("real")
    z = torch.zeros(*idx.shape, 8, dtype=torch.complex128)
    with pytest.raises(ConfigurationError, match="has no complex extension"):
        model.force(z, model.inject(idx))


@pytest.fixture(scope="module")
def fidelity_report():
    """The headline case: V=65, T=32, C=64, 4 heads, random init, float32, default settings."""
    torch.manual_seed(0)
    model = EquilibriumTransformer(65, 32, 64, 4, generator=gen(0))
    g = gen(1)
    idx, y = torch.randint(65, (4, 32), generator=g), torch.randint(65, (4, 32), generator=g)
    return probe(model, idx, y, methods=("aep", "holomorphic"), bptt=False)


@pytest.mark.parametrize("method", ["aep", "holomorphic"])
def test_fidelity_at_default_settings(fidelity_report, method):
    rows = fidelity_report.select(method=method, sweep=None)
    assert len(rows) == 10  # all + 9 groups (embed, attn, 4 heads, ffn, ln, readout)
    worst = min(rows, key=lambda r: r["cos"])
    assert worst["cos"] >= 0.999, worst
    assert all(r["converged_adjoint"] for r in rows)


def test_relaxation_map_view_for_the_jacobian_stabiliser():
    """Inside relaxation_map the force is Φ(z) = z + εF(z), so ‖J_Φ‖_F = ‖I + εJ‖_F."""
    model, idx, _ = tiny()
    z, x_in = state(model, idx)
    plain = model.force(z, x_in)
    with model.relaxation_map(0.25):
        mapped = model.force(z, x_in)
        jac = dense_jacobian(lambda t: model.force(t, x_in[:1]), z[:1])
    torch.testing.assert_close(mapped, z + 0.25 * plain)
    eye = torch.eye(jac.shape[0], dtype=jac.dtype)
    force_jac = dense_jacobian(lambda t: model.force(t, x_in[:1]), z[:1])
    torch.testing.assert_close(jac, eye + 0.25 * force_jac)
    torch.testing.assert_close(model.force(z, x_in), plain)  # restored on exit


def test_forward_with_force_noise_uses_one_draw_for_relax_force_and_adjoint():
    """One realization: reproducible from a generator, gradient = implicit at the noisy state."""
    model, idx, y = tiny(force_noise=0.2)
    noise = model.sample_noise(model.inject(idx).detach(), gen(3))
    with torch.no_grad():
        a = model(idx, tol=1e-13, max_steps=5000, generator=gen(3))
        b = model(idx, tol=1e-13, max_steps=5000, noise=noise)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.zero_grad()
    logits = model(idx, tol=1e-13, max_steps=5000, generator=gen(3))
    torch.nn.functional.cross_entropy(
        logits.reshape(-1, 7), y.reshape(-1), reduction="sum"
    ).backward()
    ref = reference_implicit_gradient(model, idx, y, noise=noise)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref["grads"][name], msg=name)


@pytest.mark.parametrize("mode", ["thick", "energy"])
def test_reset_parameters_resets_every_parameter(mode):
    """Zero biases and unit gains too: a perturbed model resets to a fresh one, bitwise."""
    fresh = EquilibriumTransformer(7, 5, 8, 2, attn_mode=mode, generator=gen(0))
    model = EquilibriumTransformer(7, 5, 8, 2, attn_mode=mode, generator=gen(0))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen(1)))
    model.reset_parameters(gen(0))
    for name, param in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[name], param), name
    assert torch.equal(model.attn.heads[0].q_norm, torch.ones(4))
    assert torch.equal(model.readout.norm.bias, torch.zeros(8))
