"""Noise is data: one realisation per estimate, shared by force, JVP and VJP."""

import pytest
import torch

from gradstats.eqprop import NoiseRealization, estimate_gradient
from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.testing import reference_implicit_gradient

from ._cases import TIGHT, NoisyTanh, RandomInsideForce, cos, flat, float64, gen, rel, tanh_case


@pytest.fixture(scope="module")
def noisy():
    with float64():
        base, x, y = tanh_case()
        return NoisyTanh(base, sigma=0.5), x, y


def test_noisy_implicit_gradient_matches_the_dense_reference(noisy):
    model, x, y = noisy
    est = estimate_gradient(model, x, y, "implicit", generator=gen(5), **TIGHT)
    ref = reference_implicit_gradient(model, x, y, noise=est.noise)
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(est.grads[name], grad)


@pytest.mark.parametrize("method", ["aep", "holomorphic"])
def test_noisy_aep_agrees_with_noisy_implicit(noisy, method):
    model, x, y = noisy
    kw = {"beta": 0.01} if method == "aep" else {"beta": 0.05, "points": 6}
    est = estimate_gradient(model, x, y, method, generator=gen(5), **kw, **TIGHT)
    ref = estimate_gradient(model, x, y, "implicit", noise=est.noise, **TIGHT)
    assert cos(flat(est.grads), flat(ref.grads)) > 0.99999
    assert rel(flat(est.grads), flat(ref.grads)) < 1e-3


def test_same_seed_same_estimate_other_seed_other_estimate(noisy):
    model, x, y = noisy
    a = estimate_gradient(model, x, y, "aep", generator=gen(1))
    b = estimate_gradient(model, x, y, "aep", generator=gen(1))
    c = estimate_gradient(model, x, y, "aep", generator=gen(2))
    torch.testing.assert_close(flat(a.grads), flat(b.grads), rtol=0, atol=0)
    assert rel(flat(a.grads), flat(c.grads)) > 1e-3


def test_explicit_noise_is_used_as_given(noisy):
    model, x, y = noisy
    noise = NoiseRealization({"mask": torch.full((5, 8), 2.0)})
    est = estimate_gradient(model, x, y, "implicit", noise=noise)
    assert est.noise is noise
    z = est.state
    torch.testing.assert_close(  # the state solves the force with *this* mask
        model.force(z, x, noise=noise), torch.zeros_like(z), atol=1e-7, rtol=0
    )


def test_a_force_that_draws_random_numbers_is_rejected():
    base, x, y = tanh_case()
    model = RandomInsideForce(base.W.data, base.U.data, base.b.data, base.C.data)
    with pytest.raises(ConfigurationError, match="drew random numbers"):
        estimate_gradient(model, x, y, "aep")


def test_noise_given_to_a_model_without_noise_argument_is_rejected():
    model, x, y = tanh_case()
    noise = NoiseRealization({"mask": torch.ones(5, 8)})
    with pytest.raises(ConfigurationTypeError, match="takes no `noise` argument"):
        estimate_gradient(model, x, y, "aep", noise=noise)
