"""Input-embedding gradients through the clamp: token and position tables, sequence states.

The model is a miniature of the equilibrium transformer's interface: state [B, T, C], injection
x_in = tok[idx] + pos, a force coupling positions causally, a readout inside a cross-entropy loss.
"""

import pytest
import torch
from torch import nn

from gradstats.eqprop import EquilibriumModule, estimate_gradient, holo_cross_entropy
from gradstats.testing import reference_implicit_gradient

from ._cases import TIGHT, cos, flat, float64, gen, rel


class TokenModel(EquilibriumModule):
    holomorphic = True

    def __init__(self, vocab=7, length=5, width=6, seed=0):
        super().__init__()
        g = gen(seed)
        self.tok = nn.Parameter(torch.randn(vocab, width, generator=g))
        self.pos = nn.Parameter(0.5 * torch.randn(length, width, generator=g))
        w = torch.randn(width, width, generator=g)
        self.mix = nn.Parameter(0.7 * w / torch.linalg.matrix_norm(w, ord=2))
        self.head = nn.Parameter(torch.randn(vocab, width, generator=g) / width**0.5)
        causal = torch.tril(torch.ones(length, length))
        self.register_buffer("avg", causal / causal.sum(1, keepdim=True))

    def inject(self, idx):
        return self.tok[idx] + self.pos[: idx.shape[1]]

    def init_state(self, x):
        return torch.zeros_like(x)

    def force(self, z, x):
        mixed = self.avg.to(z.dtype) @ torch.tanh(z)  # causal average over positions
        return -(z - x) + mixed @ self.mix.to(z.dtype).T

    def loss(self, z, y):
        return holo_cross_entropy(z @ self.head.to(z.dtype).T, y)


@pytest.fixture(scope="module")
def case():
    with float64():
        model = TokenModel()
        g = gen(1)
        idx = torch.tensor([[1, 3, 3, 0, 6], [2, 2, 5, 1, 1], [4, 0, 3, 3, 3]])  # repeated tokens
        target = torch.randint(0, 7, (3, 5), generator=g)
        return model, idx, target, reference_implicit_gradient(model, idx, target)


def test_implicit_embedding_gradients_equal_autograd_through_the_solve(case):
    model, idx, target, ref = case
    est = estimate_gradient(model, idx, target, "implicit", **TIGHT)
    for name in ("tok", "pos", "mix", "head"):
        torch.testing.assert_close(est.grads[name], ref["grads"][name])
    assert est.grads["tok"][[1, 3]].abs().sum() > 0
    unused = [t for t in range(7) if t not in idx.unique().tolist()]
    assert all(bool((est.grads["tok"][t] == 0).all()) for t in unused)


def test_clamp_gradient_is_the_adjoint_scattered(case):
    """dL/dx_in = λ (∂F/∂x_in = I): tok gets λ summed per token id, pos summed over batch."""
    model, idx, target, _ref = case
    est = estimate_gradient(model, idx, target, "implicit", **TIGHT)
    lam = est.adjoint
    tok = torch.zeros_like(model.tok).index_add_(0, idx.reshape(-1), lam.reshape(-1, 6))
    torch.testing.assert_close(est.grads["tok"], tok)
    torch.testing.assert_close(est.grads["pos"], lam.sum(0))


@pytest.mark.parametrize("method", ["aep", "holomorphic"])
def test_ep_estimators_reach_the_embeddings(case, method):
    model, idx, target, ref = case
    kw = {"beta": 0.01} if method == "aep" else {"beta": 0.05, "points": 6}
    est = estimate_gradient(model, idx, target, method, **kw, **TIGHT)
    for group in ("tok", "pos", "mix", "head"):
        assert cos(est.grads[group], ref["grads"][group]) > 0.9999
    assert rel(flat(est.grads), flat(ref["grads"])) < 1e-3


def test_parameter_groups_default_to_top_level_names(case):
    model = case[0]
    assert model.parameter_groups() == {
        "tok": ["tok"],
        "pos": ["pos"],
        "mix": ["mix"],
        "head": ["head"],
    }
