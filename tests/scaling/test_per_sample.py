"""``statistic="per_sample"`` equals a per-example autograd loop (float64), per tensor and global.

Each case builds a tiny model, runs one mean-reduced backward with the scaler attached, and
compares tr Cov(ĝ) = tr Σ / B (the scaler's noise) and ‖G‖² (its signal) with
:func:`gradstats.testing.reference_per_sample_noise`.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstats import VarianceGradientScaler
from gradstats.testing import causal_lm_objective, reference_per_sample_noise
from tests.fisher.models import hf_causal_lm


def _scaler_values(vgs: VarianceGradientScaler) -> dict[str, tuple[float, float]]:
    """{name: (noise, signal)} as totals over the tensor's elements, and "global"."""
    stats = vgs.statistics()
    out = {}
    for name, tensor in zip(vgs.layout.names, vgs.layout.tensors, strict=True):
        row = stats[name]
        out[name] = (row.variance_unbiased * tensor.numel(), row.signal_unbiased * tensor.numel())
    out["global"] = (stats["global"].variance, stats["global"].signal)
    return out


def _check(vgs, reference) -> None:
    ours = _scaler_values(vgs)
    for name, (noise, signal) in ours.items():
        torch.testing.assert_close(noise, reference[name]["noise"], msg=name)
        torch.testing.assert_close(signal, reference[name]["signal"], msg=name)
    rho, signal = vgs.get_normalized_variance(), reference["global"]["signal"]
    expected = reference["global"]["noise"] / signal if signal > 0 else math.inf  # no signal
    torch.testing.assert_close(rho, expected)


def _run(model, inputs, loss, unit="sample", **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.func fallback notices
        vgs = VarianceGradientScaler(
            model.named_parameters(), statistic="per_sample", model=model, unit=unit,
            confidence=None, **{"rule": "shrink", **kwargs},
        )  # fmt: skip
    model.zero_grad()
    loss().backward()
    vgs.step()
    vgs.remove_hooks()  # the reference's own backward passes must not reach the scaler
    return vgs


def _mlp_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    return model, x, y


def test_mlp_equals_per_example_loop():
    model, x, y = _mlp_case()
    vgs = _run(model, x, lambda: F.cross_entropy(model(x), y))
    ref = reference_per_sample_noise(
        model, x, lambda out, rows: F.cross_entropy(out, y[rows], reduction="sum")
    )
    _check(vgs, ref)


def test_summed_loss_gives_the_same_estimates():
    model, x, y = _mlp_case()
    vgs = _run(model, x, lambda: F.cross_entropy(model(x), y, reduction="sum"))
    ref = reference_per_sample_noise(
        model, x, lambda out, rows: F.cross_entropy(out, y[rows], reduction="sum")
    )
    batch = x.shape[0]  # g_i = B·c_i = B ∇l_i: noise and signal scale by B², ρ does not
    scaled = {
        name: {"noise": batch**2 * v["noise"], "signal": batch**2 * v["signal"]}
        for name, v in ref.items()
    }
    _check(vgs, scaled)


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 2, padding="same", bias=False)
        self.conv3 = nn.Conv1d(4, 2, 3, stride=1, padding=2, dilation=2)
        self.norm = nn.GroupNorm(1, 2)  # the torch.func fallback
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        h = self.norm(torch.tanh(self.conv3(h.flatten(2))))
        return self.head(h.mean(-1))


def test_cnn_equals_per_example_loop():
    torch.manual_seed(1)
    model = _CNN().double()
    x = torch.randn(5, 2, 7, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    vgs = _run(model, x, lambda: F.cross_entropy(model(x), y))
    ref = reference_per_sample_noise(
        model, x, lambda out, rows: F.cross_entropy(out, y[rows], reduction="sum")
    )
    _check(vgs, ref)


def _lm_loss(model, ids, units):
    """Σ_t −log p(x_{t+1}) / units: the mean over the scaler's units (B sequences or B·T
    positions), so that g_i = units · c_i is the unit's own gradient."""
    logits = model(ids).logits[:, :-1]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )
    return loss / units


def _lm_objective(ids):
    def objective(logits, rows):
        return causal_lm_objective(ids[rows])(logits)

    return objective


@pytest.mark.parametrize("unit", ["sample", "token"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_language_models_equal_per_example_loop(arch, unit):
    torch.manual_seed(2)
    model = hf_causal_lm(arch)
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(3))
    units = ids.shape[0] if unit == "sample" else ids.numel()
    vgs = _run(model, ids, lambda: _lm_loss(model, ids, units), unit=unit)
    ref = reference_per_sample_noise(model, ids, _lm_objective(ids), unit=unit)
    _check(vgs, ref)


def test_sequence_linear_gram_and_materialised_paths_agree():
    """T² < d_in·d_out uses the Gram identity, otherwise the materialised gradient."""
    torch.manual_seed(4)
    x = torch.randn(4, 6, 3, dtype=torch.float64)  # T = 6: T² = 36 > 3·2 → materialised
    wide = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 40)).double()  # 36 < 80: Gram
    vgs = _run(wide, x, lambda: wide(x).square().mean())
    ref = reference_per_sample_noise(wide, x, lambda out, rows: out.square().sum() / 6)
    ours = _scaler_values(vgs)
    for name in ("0.weight", "2.weight"):
        # loss mean over B·T·40 elements: per-sample g_i carries 1/(T·40): compare ρ-invariant
        # ratios noise/signal per tensor (the scale factor cancels)
        got = ours[name][0] / ours[name][1]
        torch.testing.assert_close(got, ref[name]["noise"] / ref[name]["signal"])


def test_float32_matches_float64():
    model, x, y = _mlp_case()
    vgs64 = _run(model, x, lambda: F.cross_entropy(model(x), y))
    model32 = model.float()
    x32 = x.float()
    vgs32 = _run(model32, x32, lambda: F.cross_entropy(model32(x32), y))
    a, b = _scaler_values(vgs32), _scaler_values(vgs64)
    for name in a:
        torch.testing.assert_close(a[name][0], b[name][0], rtol=1e-4, atol=1e-7)  # float32 data
        torch.testing.assert_close(a[name][1], b[name][1], rtol=1e-4, atol=1e-7)
