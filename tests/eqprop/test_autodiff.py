"""Jacobian products: the complex transpose convention and JVP/VJP adjointness (noise on)."""

import pytest
import torch

from gradstats.eqprop import Linearization, NoiseRealization, transpose_vjp
from gradstats.eqprop._problem import prepare
from gradstats.testing import dense_jacobian

from ._cases import NoisyTanh, gen, tanh_case


def _complex_map(seed=0, n=5):
    g = gen(seed)
    a = torch.complex(torch.randn(n, n, generator=g), torch.randn(n, n, generator=g))

    def fn(z):
        return torch.tanh(z @ a.T)  # holomorphic: J = diag(sech²(az)) a

    z = 0.3 * torch.complex(torch.randn(2, n, generator=g), torch.randn(2, n, generator=g))
    return fn, z, a


def _dense_complex_jacobian(fn, z, a):
    w = z @ a.T
    d = 1 - torch.tanh(w) ** 2  # [B, n]
    return [torch.diag(d[b]) @ a for b in range(z.shape[0])]


def test_pytorch_vjp_is_the_conjugate_transpose():
    """The convention we correct: torch returns Jᴴv for complex inputs."""
    fn, z, a = _complex_map()
    v = torch.ones_like(z)
    zz = z.clone().requires_grad_(True)
    (torch_vjp,) = torch.autograd.grad(fn(zz), zz, v)
    jacs = _dense_complex_jacobian(fn, z, a)
    expected = torch.stack([jacs[b].conj().T @ v[b] for b in range(2)])
    torch.testing.assert_close(torch_vjp, expected)


def test_transpose_vjp_is_the_plain_transpose():
    fn, z, a = _complex_map()
    u = torch.complex(torch.randn(2, 5, generator=gen(3)), torch.randn(2, 5, generator=gen(4)))
    jacs = _dense_complex_jacobian(fn, z, a)
    expected = torch.stack([jacs[b].T @ u[b] for b in range(2)])
    torch.testing.assert_close(transpose_vjp(fn, z, u), expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("jvp_mode", ["reverse", "forward"])
def test_linearization_at_a_complex_point(jvp_mode):
    fn, z, a = _complex_map()
    v = torch.complex(torch.randn(2, 5, generator=gen(5)), torch.randn(2, 5, generator=gen(6)))
    jacs = _dense_complex_jacobian(fn, z, a)
    lin = Linearization(fn, z, jvp_mode)
    torch.testing.assert_close(lin.jvp(v), torch.stack([jacs[b] @ v[b] for b in range(2)]))
    torch.testing.assert_close(lin.vjp(v), torch.stack([jacs[b].T @ v[b] for b in range(2)]))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("jvp_mode", ["reverse", "forward"])
def test_linearization_at_a_real_point_accepts_complex_vectors(jvp_mode):
    model, x, _ = tanh_case()
    z = 0.5 * torch.randn(5, 8, generator=gen(7))
    jac = dense_jacobian(lambda t: model.force(t, x), z)  # [40, 40], block diagonal
    lin = Linearization(lambda t: model.force(t, x), z, jvp_mode)
    v = torch.complex(torch.randn(5, 8, generator=gen(8)), torch.randn(5, 8, generator=gen(9)))
    jvp = torch.complex(jac @ v.real.reshape(-1), jac @ v.imag.reshape(-1)).reshape(5, 8)
    vjp = torch.complex(jac.T @ v.real.reshape(-1), jac.T @ v.imag.reshape(-1)).reshape(5, 8)
    torch.testing.assert_close(lin.jvp(v), jvp)
    torch.testing.assert_close(lin.vjp(v), vjp)
    torch.testing.assert_close(lin.antisymmetric(v), jvp - vjp)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("jvp_mode", ["reverse", "forward"])
def test_products_keep_a_parameter_graph_only_with_create_graph(jvp_mode):
    """Both JVP modes: a graph to the parameters with ``create_graph`` (penalties), none
    without it or inside ``detached()`` (power iterations, adjoint solves), same values."""
    model, x, _ = tanh_case()
    z = 0.5 * torch.randn(5, 8, generator=gen(7))
    v = torch.randn(5, 8, generator=gen(8))
    force = lambda t: model.force(t, x)  # noqa: E731
    kept = Linearization(force, z, jvp_mode, create_graph=True)
    plain = Linearization(force, z, jvp_mode)
    with_graph = kept.jvp(v)
    assert with_graph.requires_grad
    with kept.detached():
        inside = kept.jvp(v)
    for product in (inside, plain.jvp(v)):
        assert not product.requires_grad
        torch.testing.assert_close(product, with_graph.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adjointness_holds_with_noise_on(seed):
    """⟨u, Jv⟩ = ⟨Jᵀu, v⟩ for the noisy force: JVP and VJP see one noise realisation."""
    base, x, y = tanh_case()
    model = NoisyTanh(base, sigma=0.5)
    problem = prepare(model, x, y, generator=gen(11))
    assert problem.noise is not None
    z = 0.5 * torch.randn(5, 8, generator=gen(12))
    lin = Linearization(problem.force, z)
    u = torch.randn(5, 8, generator=gen(20 + seed))
    v = torch.randn(5, 8, generator=gen(30 + seed))
    gap = lin.adjointness_gap(u, v)
    assert abs(float(gap)) < 1e-12 * float(u.norm() * v.norm())


def test_linearization_of_the_noisy_force_is_the_noisy_jacobian():
    base, x, y = tanh_case()
    model = NoisyTanh(base, sigma=0.5)
    problem = prepare(model, x, y, generator=gen(11))
    z = 0.5 * torch.randn(5, 8, generator=gen(12))
    lin = Linearization(problem.force, z)
    # the Jacobian really is the noisy one (not the noiseless force's)
    jac = dense_jacobian(problem.force, z)
    v = torch.randn(5, 8, generator=gen(40))
    torch.testing.assert_close(lin.jvp(v).reshape(-1), jac @ v.reshape(-1))
    clean = dense_jacobian(lambda t: base.force(t, x), z)
    assert (jac - clean).norm() > 0.1 * clean.norm()


def test_noise_realization_casts_only_floating_tensors():
    noise = NoiseRealization({"mask": torch.ones(2), "idx": torch.arange(2)}, seed=3)
    moved = noise.to(torch.float32)
    assert moved["mask"].dtype == torch.float32
    assert moved["idx"].dtype == torch.int64
    assert moved.seed == 3
