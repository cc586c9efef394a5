"""Where the factor goes: gradients or learning rates, for exactly one optimizer step."""

import warnings

import pytest
import torch

from gradstats import VarianceGradientScaler
from gradstats.errors import ConfigurationError


def _setup(apply_to, lr=0.1, optimizer=torch.optim.SGD, groups=False, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    params = (
        [{"params": [model.weight]}, {"params": [model.bias]}] if groups else model.parameters()
    )
    opt = optimizer(params, lr=lr)
    kwargs = {"statistic": "temporal", "rule": "shrink", **kwargs}  # the tested semantics
    vgs = VarianceGradientScaler(model.named_parameters(), apply_to=apply_to, optimizer=opt,
                                 beta=0.5, confidence=None, **kwargs)  # fmt: skip
    for k in range(5):
        opt.zero_grad()
        g = torch.Generator().manual_seed(k)
        model(torch.randn(6, 4, generator=g)).pow(2).mean().backward()
        vgs.step()
    return model, opt, vgs


def test_apply_to_grad_multiplies_the_gradients():
    model, opt, vgs = _setup("grad")
    before = model.weight.grad.clone()
    with vgs.apply(opt):
        pass
    torch.testing.assert_close(model.weight.grad, before * vgs.get_scaling_factor())


def test_apply_to_lr_scales_and_restores_float_lr():
    _model, opt, vgs = _setup("lr")
    seen = []
    with vgs.apply(opt):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
    assert seen[0] == pytest.approx(0.1 * vgs.get_scaling_factor())
    assert opt.param_groups[0]["lr"] == 0.1


def test_apply_to_lr_with_tensor_lr_stays_on_device():
    _model, opt, vgs = _setup("lr", lr=torch.tensor(0.1))
    original = opt.param_groups[0]["lr"]
    with vgs.apply(opt):
        scaled = opt.param_groups[0]["lr"]
        assert isinstance(scaled, torch.Tensor)
        torch.testing.assert_close(scaled, original * vgs.get_scaling_factor())
    assert opt.param_groups[0]["lr"] is original


def test_lr_restored_even_if_the_step_fails():
    _model, opt, vgs = _setup("lr")
    with pytest.raises(RuntimeError, match="boom"), vgs.apply(opt):
        raise RuntimeError("boom")
    assert opt.param_groups[0]["lr"] == 0.1


def test_per_group_lr_factors():
    _model, opt, vgs = _setup("lr", groups=True, aggregate="param_group")
    stats = vgs.statistics()
    with vgs.apply(opt):
        lrs = [group["lr"] for group in opt.param_groups]
    assert lrs == pytest.approx([0.1 * stats["group0"].factor, 0.1 * stats["group1"].factor])


def test_adaptive_optimizer_with_apply_to_grad_warns():
    with pytest.warns(UserWarning, match="adaptive optimizer"):
        _setup("grad", optimizer=torch.optim.Adam)


def test_adaptive_optimizer_with_apply_to_lr_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _setup("lr", optimizer=torch.optim.Adam)


def test_scale_gradients_refuses_apply_to_lr():
    _, _, vgs = _setup("lr")
    with pytest.raises(RuntimeError, match="apply_to='grad'"):
        vgs.scale_gradients()


def test_apply_to_lr_needs_an_optimizer():
    model = torch.nn.Linear(2, 1)
    vgs = VarianceGradientScaler(
        model.parameters(), apply_to="lr", statistic="temporal", rule="shrink"
    )
    with pytest.raises(ConfigurationError, match="needs the optimizer"), vgs.apply():
        pass


def test_apply_to_lr_needs_as_many_param_groups_as_aggregates():
    _model, _opt, vgs = _setup("lr", groups=True, aggregate="param_group")
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    match = "1 param groups but the scaler aggregates over 2"
    with pytest.raises(ConfigurationError, match=match), vgs.apply(other):
        pass
