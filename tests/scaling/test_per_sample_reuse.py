"""``statistic="per_sample"``: sequence Linear/Conv1D sites whose weight gradient is built from
the per-unit gradients (``_per_sample_linear``), pinned to the float64 per-example loop, to the
plain backward's ``.grad`` and to float64 from float32 data; and the Gram route beside it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstats import VarianceGradientScaler
from gradstats.scaling import _per_sample_linear
from gradstats.testing import reference_per_sample_noise
from tests.fisher.models import hf_causal_lm
from tests.scaling.test_per_sample import _check, _lm_loss, _lm_objective, _run, _scaler_values


def _route(monkeypatch, route: str) -> None:
    """Force every sequence Linear/Conv1D site onto one route ("reuse" or "gram/materialise")."""
    overhead, passes = (0.0, 0.0) if route == "reuse" else (0.0, float("inf"))
    monkeypatch.setattr(_per_sample_linear, "GEMM_OVERHEAD", overhead)
    monkeypatch.setattr(_per_sample_linear, "PASS_MACS", passes)


@pytest.mark.parametrize("route", ["reuse", "gram"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_language_models_equal_per_example_loop(monkeypatch, arch, route):
    _route(monkeypatch, route)
    torch.manual_seed(2)
    model = hf_causal_lm(arch)  # gpt2: lm_head tied to wte (a shared site with a dense part)
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(3))
    vgs = _run(model, ids, lambda: _lm_loss(model, ids, ids.shape[0]))
    ref = reference_per_sample_noise(model, ids, _lm_objective(ids))
    _check(vgs, ref)


def _sequence_mlp() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))


def test_reuse_route_is_taken_and_grad_equals_plain_backward(monkeypatch):
    _route(monkeypatch, "reuse")
    model = _sequence_mlp()
    plain = copy.deepcopy(model)
    x = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(6))
    _run(model, x, lambda: model(x).square().mean())
    plain(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)  # float32, summation order only
    hooked = VarianceGradientScaler(
        model.named_parameters(), statistic="per_sample", model=model, rule="shrink"
    )
    assert type(model(x).grad_fn).__name__ == "LinearSiteBackward"
    hooked.remove_hooks()
    assert type(model(x).grad_fn).__name__ == "ViewBackward0"


def test_reuse_route_float32_matches_float64(monkeypatch):
    _route(monkeypatch, "reuse")
    model64 = _sequence_mlp().double()
    x64 = torch.randn(5, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    vgs64 = _run(model64, x64, lambda: model64(x64).square().mean())
    model32, x32 = copy.deepcopy(model64).float(), x64.float()
    vgs32 = _run(model32, x32, lambda: model32(x32).square().mean())
    a, b = _scaler_values(vgs32), _scaler_values(vgs64)
    for name in a:
        torch.testing.assert_close(a[name][0], b[name][0], rtol=1e-4, atol=1e-7)  # float32 data
        torch.testing.assert_close(a[name][1], b[name][1], rtol=1e-4, atol=1e-7)


def test_reuse_route_chunks_units_and_output_features(monkeypatch):
    """Budgets below one unit's gradient: chunks of units and of output features agree."""
    _route(monkeypatch, "reuse")
    model = _sequence_mlp().double()
    x = torch.randn(5, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    whole = _scaler_values(_run(model, x, lambda: model(x).square().mean()))
    monkeypatch.setattr(_per_sample_linear, "CACHE_BYTES", 8)
    vgs = VarianceGradientScaler(
        model.named_parameters(),
        statistic="per_sample",
        model=model,
        confidence=None,
        rule="shrink",
    )
    vgs._tracker.modules.chunk_bytes = 40  # < 4·4·8 B, one unit's weight: features in chunks
    model.zero_grad()
    model(x).square().mean().backward()
    vgs.step()
    chunked = _scaler_values(vgs)
    for name, value in whole.items():
        torch.testing.assert_close(chunked[name], value, msg=name)


def test_create_graph_backward_is_differentiable(monkeypatch):
    """create_graph=True (a gradient penalty) gets autograd's differentiable formulas."""
    _route(monkeypatch, "reuse")
    model = _sequence_mlp().double()
    plain = copy.deepcopy(model)
    x = torch.randn(4, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def penalty(m: nn.Module) -> torch.Tensor:
        grads = torch.autograd.grad(m(x).square().mean(), list(m.parameters()), create_graph=True)
        return sum(g.square().sum() for g in grads)

    vgs = _run(model, x, lambda: penalty(model))
    penalty(plain).backward()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    vgs.remove_hooks()


def test_frozen_input_layer_and_no_bias(monkeypatch):
    _route(monkeypatch, "reuse")
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    vgs = _run(model, x, lambda: F.mse_loss(model(x), torch.zeros(4, 6, 2, dtype=x.dtype)))
    ref = reference_per_sample_noise(
        model, x, lambda out, rows: F.mse_loss(out, torch.zeros_like(out), reduction="sum") / 12
    )
    ours = _scaler_values(vgs)
    for name in ("0.weight", "2.weight", "2.bias"):  # ρ-invariant ratios (loss scale cancels)
        got = ours[name][0] / ours[name][1]
        torch.testing.assert_close(got, ref[name]["noise"] / ref[name]["signal"], msg=name)
