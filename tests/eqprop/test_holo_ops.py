"""Holomorphic ops equal the real ops on the real axis and are complex-analytic."""

import math

import pytest
import torch
import torch.nn.functional as F

from gradstats.eqprop import (
    holo_cross_entropy,
    holo_gelu,
    holo_layer_norm,
    holo_logsumexp,
    holo_masked_softmax,
)
from gradstats.errors import ConfigurationTypeError

from ._cases import gen

CAUSAL = torch.tril(torch.ones(4, 4, dtype=torch.bool))


def _ln(x):
    w = torch.linspace(0.5, 1.5, x.shape[-1], dtype=x.real.dtype)
    return holo_layer_norm(x, w, 0.1 * w)


def _softmax(x):
    return holo_masked_softmax(x, CAUSAL)


def _ce(x):
    return holo_cross_entropy(x, torch.tensor([0, 3, 1, 2]))


OPS = {
    "layer_norm": (_ln, lambda x: F.layer_norm(x, x.shape[-1:], *_ln_params(x))),
    "masked_softmax": (_softmax, lambda x: torch.softmax(x.masked_fill(~CAUSAL, -math.inf), -1)),
    "gelu": (holo_gelu, lambda x: F.gelu(x, approximate="tanh")),
    "logsumexp": (lambda x: holo_logsumexp(x, -1), lambda x: torch.logsumexp(x, -1)),
    "cross_entropy": (_ce, lambda x: F.cross_entropy(x, torch.tensor([0, 3, 1, 2]))),
}


def _ln_params(x):
    w = torch.linspace(0.5, 1.5, x.shape[-1], dtype=x.dtype)
    return w, 0.1 * w


@pytest.mark.parametrize("op", sorted(OPS))
def test_equals_the_real_op_on_the_real_axis(op):
    ours, reference = OPS[op]
    x = 2 * torch.randn(4, 4, generator=gen(1))
    torch.testing.assert_close(ours(x), reference(x))


@pytest.mark.parametrize("op", sorted(OPS))
def test_is_complex_analytic(op):
    """Cauchy–Riemann: the difference quotient is the same along 1 and along i."""
    fn = OPS[op][0]
    g = gen(2)
    z = torch.complex(torch.randn(4, 4, generator=g), 0.2 * torch.randn(4, 4, generator=g))
    d = torch.complex(torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g))
    h = 1e-6
    along_real = (fn(z + h * d) - fn(z - h * d)) / (2 * h)
    along_imag = (fn(z + 1j * h * d) - fn(z - 1j * h * d)) / (2j * h)
    torch.testing.assert_close(along_real, along_imag, rtol=1e-6, atol=1e-8)  # FD: O(h²)


@pytest.mark.parametrize("op", sorted(OPS))
def test_real_part_of_the_extension_matches_near_the_axis(op):
    """f(x + iε) = f(x) + iε f'(x) + O(ε²): the complex-step derivative is the real derivative."""
    ours, reference = OPS[op]
    x = torch.randn(4, 4, generator=gen(3))
    d = torch.randn(4, 4, generator=gen(4))
    eps = 1e-20
    complex_step = ours(torch.complex(x, eps * d)).imag / eps
    _, expected = torch.autograd.functional.jvp(reference, x, d)
    torch.testing.assert_close(complex_step, expected)


def test_masked_softmax_shift_ignores_masked_logits():
    """A huge logit at a masked position must not underflow the valid entries."""
    a = torch.randn(4, 4, generator=gen(5))
    a_bad = a.masked_fill(~CAUSAL, 1e4)
    naive = torch.exp(a_bad - a_bad.amax(-1, keepdim=True)) * CAUSAL
    naive = naive / naive.sum(-1, keepdim=True)
    assert not torch.isfinite(naive).all()  # the original's shift: 0/0 on the first rows
    expected = torch.softmax(a.masked_fill(~CAUSAL, -math.inf), -1)
    torch.testing.assert_close(holo_masked_softmax(a_bad, CAUSAL), expected)
    za = torch.complex(a_bad, 0.1 * torch.ones_like(a_bad))
    out = holo_masked_softmax(za, CAUSAL)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(4, dtype=out.dtype))


def test_masked_softmax_masked_entries_have_zero_gradient_and_empty_rows_are_zero():
    mask = CAUSAL.clone()
    mask[0] = False
    a = torch.randn(4, 4, generator=gen(6)).masked_fill(~mask, 1e4).requires_grad_(True)
    out = holo_masked_softmax(a, mask)
    assert (out[0] == 0).all()
    (grad,) = torch.autograd.grad((out * torch.randn(4, 4, generator=gen(7))).sum(), a)
    assert torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()


def test_masked_softmax_rejects_a_non_bool_mask():
    with pytest.raises(ConfigurationTypeError, match="mask must be a bool tensor"):
        holo_masked_softmax(torch.zeros(2, 2), torch.ones(2, 2))


def test_cross_entropy_ignores_index():
    logits = torch.randn(5, 3, generator=gen(8))
    target = torch.tensor([0, -100, 2, 1, -100])
    torch.testing.assert_close(holo_cross_entropy(logits, target), F.cross_entropy(logits, target))
