"""The original's method names and call order keep working, without its bugs."""

import pytest
import torch

from gradstats import VarianceGradientScaler


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def _batch(k):
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(8, 3, generator=g)
    return x, x.sum(1, keepdim=True)


def _train(order, steps=12, lr=0.05):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    vgs = VarianceGradientScaler(
        model.named_parameters(), beta=0.8, confidence=None, statistic="temporal", rule="shrink"
    )
    for k in range(steps):
        x, y = _batch(k)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if order == "new":
            vgs.step()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            with vgs.apply(opt):
                opt.step()
        else:  # the original trainer: scale, clip, optimizer step, then vgs.step()
            vgs.scale_gradients()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            vgs.step()
    return model, vgs


def test_original_order_reads_raw_gradients_once_like_the_new_order():
    """Same gradient stream (lr = 0): both orders must see exactly the raw gradients, so their
    statistics agree bitwise; the original read its own scaled, clipped output instead."""
    _, a = _train("new", lr=0.0)
    _, b = _train("legacy", lr=0.0)
    assert a.updates == b.updates == 12
    sa, sb = a.state_dict()["tensors"], b.state_dict()["tensors"]
    for name in sa:
        assert torch.equal(sa[name]["mean"], sb[name]["mean"])
        assert torch.equal(sa[name]["sq_ema"], sb[name]["sq_ema"])
    assert a.get_scaling_factor() == b.get_scaling_factor() < 1.0


def test_statistics_are_never_read_back_from_scaled_gradients():
    model = _model()
    vgs = VarianceGradientScaler(
        model.named_parameters(), beta=0.8, confidence=None, statistic="temporal", rule="shrink"
    )
    x, y = _batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    vgs.step()
    state = vgs.state_dict()
    vgs.scale_gradients()
    vgs.scale_gradients()  # at most once per set of gradients
    vgs.step()  # nothing new to read
    assert vgs.updates == 1
    assert torch.equal(
        state["tensors"]["0.weight"]["mean"], vgs.state_dict()["tensors"]["0.weight"]["mean"]
    )


def test_replaced_gradients_are_recognised_as_new():
    p = torch.nn.Parameter(torch.zeros(3))
    vgs = VarianceGradientScaler([("p", p)], confidence=None, statistic="temporal", rule="shrink")
    for k in range(3):
        p.grad = torch.full((3,), float(k))
        vgs.step()
    assert vgs.updates == 3


def test_update_statistics_always_reads():
    p = torch.nn.Parameter(torch.zeros(3))
    vgs = VarianceGradientScaler([p], confidence=None, statistic="temporal", rule="shrink")
    p.grad = torch.ones(3)
    vgs.update_statistics()
    vgs.update_statistics()
    assert vgs.updates == 2


def test_legacy_names_exist_and_behave():
    model = _model()
    vgs = VarianceGradientScaler(
        model.parameters(), warmup_steps=2, confidence=None, statistic="temporal", rule="shrink"
    )
    for k in range(4):
        model.zero_grad()
        x, y = _batch(k)
        torch.nn.functional.mse_loss(model(x), y).backward()
        vgs.update_statistics()
    assert isinstance(vgs.get_normalized_variance(), float)
    assert 0.0 < vgs.get_scaling_factor() <= 1.0
    vgs.reset_statistics()
    assert vgs.get_scaling_factor() == 1.0
    vgs.warmup_steps = 5
    assert vgs.config.warmup_steps == 5
    vgs.enabled = False
    grad = next(model.parameters()).grad.clone()
    vgs.scale_gradients()
    assert torch.equal(next(model.parameters()).grad, grad)
    assert vgs.get_scaling_factor() == 1.0
    report = vgs.update_parameters(_model(1).parameters())
    assert report.loaded == vgs.layout.names


def test_disabled_scaler_is_a_no_op():
    model = _model()
    vgs = VarianceGradientScaler(
        model.named_parameters(), enabled=False, statistic="temporal", rule="shrink"
    )
    x, y = _batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    vgs.step()
    assert vgs.updates == 0
    with vgs.apply():
        pass


def test_logger_receives_vgs_keys():
    records = []
    model = _model()
    vgs = VarianceGradientScaler(
        model.named_parameters(), log_every=2, batch_size=8, statistic="temporal", rule="shrink",
        logger=lambda metrics, step: records.append((step, metrics)),
    )  # fmt: skip
    for k in range(4):
        model.zero_grad()
        x, y = _batch(k)
        torch.nn.functional.mse_loss(model(x), y).backward()
        vgs.step()
    assert [step for step, _ in records] == [2, 4]
    keys = set(records[-1][1])
    assert {
        "vgs/factor",
        "vgs/rho",
        "vgs/noise",
        "vgs/signal",
        "vgs/B_noise",
        "vgs/nonfinite_steps",
        "vgs/skipped",
    } <= keys
    assert all(key.startswith("vgs/") for key in keys)


def test_repr_names_the_configuration():
    vgs = VarianceGradientScaler(_model().named_parameters(), statistic="same_point", rule="shrink")
    assert "same_point" in repr(vgs)


def test_logger_must_be_callable():
    with pytest.raises(TypeError, match="logger must be callable"):
        VarianceGradientScaler(
            _model().named_parameters(), logger="tensorboard", statistic="temporal", rule="shrink"
        )
