"""The layered equilibrium block: at feedback 0 its fixed point is the backprop baseline's layer
(reached in two map steps) and every estimator's gradient is backprop's; at feedback > 0 it is a
genuine equilibrium whose gradients match the dense implicit reference."""

import pytest
import torch

from gradstats.eqprop import estimate_gradient, relax
from gradstats.eqprop.models import BackpropTransformer, EquilibriumTransformer
from gradstats.eqprop.train import TrainConfig
from gradstats.errors import ConfigurationError
from gradstats.testing import reference_implicit_gradient

from ._cases import cos, flat, gen

TIGHT = {"tol": 1e-13, "tol_adjoint": 1e-12, "max_steps": 5000, "max_steps_adjoint": 5000}


def layered(feedback=0.0, damping=0.0, std=0.3, seed=0):
    model = EquilibriumTransformer(
        7, 5, 8, 2, damping, "layered", feedback=feedback, init_std=std, generator=gen(seed)
    ).double()
    idx = torch.tensor([[1, 3, 3, 0, 1], [2, 2, 6, 1, 3]])
    y = torch.randint(7, (2, 5), generator=gen(seed + 1))
    return model, idx, y


def baseline_like(model):
    """A one-layer BackpropTransformer holding ``model``'s weights."""
    base = BackpropTransformer(7, 5, 8, 2).double()
    renamed = {
        (f"layers.0.{k}" if k.startswith(("attn.", "ffn.")) else k): v
        for k, v in model.state_dict().items()
    }
    base.load_state_dict(renamed)
    return base


def backprop_grads(model, idx, y):
    """The baseline's autograd gradient, under the equilibrium model's parameter names."""
    base = baseline_like(model)
    grads = torch.autograd.grad(base.loss(idx, y), list(base.parameters()))
    named = dict(zip([n for n, _ in base.named_parameters()], grads, strict=True))
    return {n.removeprefix("layers.0."): g for n, g in named.items()}


def test_the_fixed_point_is_the_feed_forward_layer_reached_in_two_steps():
    model, idx, _ = layered()
    with torch.no_grad():
        z, stats = relax(model, idx, tol=1e-14)
        torch.testing.assert_close(model.logits(z), baseline_like(model)(idx), rtol=0, atol=1e-12)
    assert stats.steps.max() <= 3  # two map steps reach it; a third sees a zero residual
    assert z.shape == (2, 5, 16)  # [a ‖ h]: 2C features


@pytest.mark.parametrize("damping", [0.5, 2.0])
def test_damping_shrinks_the_stream_after_each_sub_layer_and_keeps_two_steps(damping):
    model, idx, _ = layered(damping=damping)
    with torch.no_grad():
        z, stats = relax(model, idx, tol=1e-14)
        x = model.inject(idx)
        a = x + model.attn(torch.nn.functional.layer_norm(x, (8,), *_affine(model.attn.norm)))
        a = a / (1 + damping)
        h = a + model.ffn(torch.nn.functional.layer_norm(a, (8,), *_affine(model.ffn.norm)))
        torch.testing.assert_close(z, torch.cat([a, h / (1 + damping)], -1), rtol=0, atol=1e-12)
    assert stats.steps.max() <= 3


def _affine(norm):
    return norm.weight, norm.bias


@pytest.mark.parametrize(("method", "kw"), [("implicit", {}), ("aep", {"beta": 1e-4}),
                                            ("holomorphic", {"beta": 1e-2})])  # fmt: skip
def test_every_estimator_gives_the_backprop_gradient_at_feedback_zero(method, kw):
    model, idx, y = layered()
    tight = TIGHT if method == "implicit" else {**TIGHT, "tol_adjoint": 1e-9}
    est = estimate_gradient(model, idx, y, method, **kw, **tight)
    ref = backprop_grads(model, idx, y)
    assert set(est.grads) == set(ref)
    assert cos(flat(est.grads), flat(ref)) > 1 - 1e-8
    if method == "implicit":
        for name, grad in ref.items():
            torch.testing.assert_close(est.grads[name], grad, rtol=1e-9, atol=1e-11)


def test_forward_backpropagates_the_backprop_gradient_at_feedback_zero():
    model, idx, y = layered()
    loss = torch.nn.functional.cross_entropy(
        model(idx).reshape(-1, 7), y.reshape(-1), reduction="sum"
    )
    grads = dict(zip([n for n, _ in model.named_parameters()],
                     torch.autograd.grad(loss, list(model.parameters())), strict=True))  # fmt: skip
    for name, grad in backprop_grads(model, idx, y).items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("feedback", [0.5, 1.0])
def test_with_feedback_the_implicit_gradient_matches_the_dense_reference(feedback):
    model, idx, y = layered(feedback, std=0.2)
    _z, stats = relax(model, idx, tol=1e-13, max_steps=5000)
    assert stats.all_converged()
    assert stats.steps.max() > 3
    ref = reference_implicit_gradient(model, idx, y)
    est = estimate_gradient(model, idx, y, "implicit", adjoint_solver="gmres", **TIGHT)
    for name in ("embed.token", "attn.heads.1.query", "ffn.up.weight", "readout.proj"):
        torch.testing.assert_close(est.grads[name], ref["grads"][name])
    aep = estimate_gradient(model, idx, y, "aep", beta=1e-4, **{**TIGHT, "tol_adjoint": 1e-9})
    assert cos(flat(aep.grads), flat(ref["grads"])) > 1 - 1e-7


def test_the_holomorphic_force_equals_the_real_force_on_the_real_axis():
    model, idx, _ = layered(0.5)
    x = model.inject(idx).detach()
    z = model.init_state(x) + 0.3 * torch.randn(2, 5, 16, generator=gen(3), dtype=x.dtype)
    with torch.no_grad():
        real = model.force(z, x)
        extended = model.force(z.to(torch.complex128), x)
    torch.testing.assert_close(extended.real, real)
    torch.testing.assert_close(extended.imag, torch.zeros_like(real))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"feedback": 0.5}, "feedback must be in"),  # thick
        ({"attn_mode": "layered", "feedback": 1.5}, "feedback must be in"),
        ({"attn_mode": "layered", "feedback": -0.1}, "feedback must be"),
        ({"attn_mode": "layered", "feedback": float("nan")}, "feedback must be"),
    ],
)
def test_bad_feedback_is_refused(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        EquilibriumTransformer(7, 5, 8, 2, **kwargs)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"feedback": 0.5}, "parameter of the layered block"),
        (
            {"method": "backprop", "attn_mode": "layered", "feedback": 0.5},
            r"does not use .*feedback=0\.5 \(only",
        ),
        ({"attn_mode": "layered", "feedback": 2.0}, r"feedback must be in \[0, 1\]"),
    ],
)
def test_the_trainer_refuses_feedback_where_it_would_be_ignored(options, match):
    with pytest.raises(ConfigurationError, match=match):
        TrainConfig(**options)


def test_the_trainer_builds_the_layered_model():
    model = TrainConfig(attn_mode="layered", feedback=0.25, d_model=16).build_model(11)
    assert model.mode == "layered"
    assert model.feedback == 0.25
    assert model.config()["feedback"] == 0.25


def test_the_layered_state_has_two_sub_states_per_token():
    assert layered()[0].state_features == 16  # d_model 8: [a ‖ h]
    thick = EquilibriumTransformer(7, 5, 8, 2, generator=gen(0))
    assert thick.state_features == 8


def test_the_auto_thread_count_sees_the_layered_state(tmp_path, data, no_plot, monkeypatch):
    import gradstats.eqprop.train._loop as loop

    seen = []
    monkeypatch.setattr(loop, "auto_threads", lambda n: seen.append(n) or 1)
    from gradstats.eqprop.train import train

    train(TrainConfig(method="aep", attn_mode="layered", steps=1, data=data, d_model=16,
                      n_heads=2, block_size=12, batch_size=3, eval_batches=1, progress=False,
                      out=tmp_path / "run"))  # fmt: skip
    assert seen == [3 * 12 * 32]  # B·T·2C
