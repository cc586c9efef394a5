"""Writing gradients into .grad, and torchdeq's IFT backward as an oracle where installed."""

import pytest
import torch

from gradstats.eqprop import estimate_gradient, write_grads
from gradstats.errors import ConfigurationError, ConfigurationTypeError

from ._cases import TIGHT, tanh_case


def test_write_grads_replaces_or_accumulates():
    model, x, y = tanh_case()
    est = estimate_gradient(model, x, y, "aep")
    assert est.write_grads(model) is True
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, est.grads[name])
        assert p.grad.data_ptr() != est.grads[name].data_ptr()
    est.write_grads(model, accumulate=True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * est.grads[name])


def test_write_grads_checks_names_and_shapes_before_writing():
    model, _x, _y = tanh_case()
    with pytest.raises(ConfigurationError, match="not a parameter"):
        write_grads(model, {"W": torch.zeros(8, 8), "V": torch.zeros(1)})
    assert model.W.grad is None
    with pytest.raises(ConfigurationError, match="has shape"):
        write_grads(model, {"W": torch.zeros(3)})
    with pytest.raises(ConfigurationTypeError, match=r"grads\['W'\] must be a torch.Tensor"):
        write_grads(model, {"b": torch.zeros(8), "W": [[0.0] * 8] * 8})
    assert all(p.grad is None for p in model.parameters())


def test_grads_cover_every_trainable_parameter():
    model, x, y = tanh_case()
    model.b.requires_grad_(False)
    est = estimate_gradient(model, x, y, "implicit")
    assert set(est.grads) == {"W", "U", "C"}


def test_implicit_gradient_agrees_with_torchdeq_ift_backward():
    torchdeq = pytest.importorskip("torchdeq")
    model, x, y = tanh_case()
    eps = 0.5
    deq = torchdeq.get_deq(
        core="indexing",
        ift=True,
        f_solver="fixed_point_iter",
        b_solver="fixed_point_iter",
        f_max_iter=2000,
        b_max_iter=2000,
        f_tol=1e-14,
        b_tol=1e-14,
    )
    deq.train()
    z_out, _ = deq(lambda z: z + eps * model.force(z, x), torch.zeros(5, 8))
    model.zero_grad()
    model.loss(z_out[-1], y).backward()
    theirs = {n: p.grad.clone() for n, p in model.named_parameters()}
    ours = estimate_gradient(model, x, y, "implicit", step_size=eps, **TIGHT)
    for name, grad in theirs.items():
        torch.testing.assert_close(ours.grads[name], grad)
