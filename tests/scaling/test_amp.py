"""AMP: statistics read unscaled gradients; loss-scale jumps and skipped steps change nothing."""

import contextlib

import pytest
import torch

from gradstats import VarianceGradientScaler
from gradstats.scaling import optimizer_step


def _run(use_amp, statistic="temporal", overflow_at=None, steps=10):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    vgs = VarianceGradientScaler(model.named_parameters(), statistic=statistic, optimizer=opt,
                                 beta=0.8, confidence=None, rule="shrink")  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2, enabled=use_amp)
    scales = []
    for k in range(steps):
        g = torch.Generator().manual_seed(k)
        opt.zero_grad()
        for part in range(2):  # two micro-batches (same_point sees them)
            x = torch.randn(6, 4, generator=g)
            loss = model(x).pow(2).mean() / 2
            if k == overflow_at and part == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
        scales.append(scaler.get_scale() if use_amp else 1.0)
        optimizer_step(opt, vgs, grad_scaler=scaler, max_grad_norm=10.0)
    return model, vgs, scales


@pytest.mark.parametrize("statistic", ["temporal", "same_point"])
def test_loss_scale_jumps_do_not_change_the_statistics(statistic):
    model_a, plain, _ = _run(False, statistic)
    model_b, amp, scales = _run(True, statistic)
    assert len(set(scales)) > 3  # the loss scale grew several times
    assert amp.get_scaling_factor() == pytest.approx(plain.get_scaling_factor(), rel=1e-6)
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_overflow_step_is_skipped_by_both_scalers_and_changes_nothing():
    _, amp, scales = _run(True, overflow_at=4, steps=6)
    stats = amp.statistics()["global"]
    assert stats.skipped == 1
    assert stats.nonfinite_steps == 1
    assert scales[5] == scales[4] / 2  # GradScaler backed off
    assert stats.count == 5


@pytest.mark.parametrize("statistic", ["temporal", "same_point", "mixed"])
def test_reading_still_scaled_gradients_equals_reading_unscaled_ones(statistic):
    """scaled=True (before unscale_, as trainers that unscale inside clipping need) divides
    every observation by the loss scale: same statistics as the documented order."""

    def run(before_unscale):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        legacy = pytest.warns(UserWarning, match="legacy diagnostic")
        with legacy if statistic == "mixed" else contextlib.nullcontext():
            vgs = VarianceGradientScaler(
                model.named_parameters(),
                statistic=statistic,
                beta=0.8,
                confidence=None,
                rule="shrink",
            )
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        for k in range(8):
            g = torch.Generator().manual_seed(k)
            opt.zero_grad()
            for _ in range(2):
                scaler.scale(model(torch.randn(6, 4, generator=g)).pow(2).mean() / 2).backward()
            if before_unscale:
                vgs.step(grad_scaler=scaler, scaled=True)
                scaler.unscale_(opt)
            else:
                scaler.unscale_(opt)
                vgs.step(grad_scaler=scaler)
            scaler.step(opt)
            scaler.update()
        return vgs.statistics()["global"]

    a, b = run(True), run(False)
    assert a.normalized_variance == pytest.approx(b.normalized_variance, rel=1e-12)
    assert a.variance == pytest.approx(b.variance, rel=1e-12)


def test_scaled_without_a_grad_scaler_is_an_error():
    model = torch.nn.Linear(2, 1)
    vgs = VarianceGradientScaler(model.parameters(), statistic="temporal", rule="shrink")
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(ValueError, match="scaled=True needs the grad_scaler"):
        vgs.step(scaled=True)
