"""The CPU fast paths of the Linear closed form, pinned to float64 loops (float32 and float64):

* Σg² products added by ``addmm_`` straight into the pending sums after acceptance;
* the finiteness proxy Σ_i ‖b_i‖²‖a_i‖² instead of a sum over each parameter-sized Σg²;
* weight row + bias of one output-channel group fused: trace b²(‖a‖² + 1), mask value b·y;
* the mean gradient summed by the hooks (no weight-gradient GEMMs in autograd).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradstats.fisher import FisherCollector
from gradstats.testing import per_sample_gradients


def _mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _data(dtype, n=9, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen).to(dtype), torch.randint(0, 3, (n,), generator=gen)


def _reference(model, batches):
    grads = [per_sample_gradients(model, x, y) for x, y in batches]
    return {n: torch.cat([g[n].double() for g in grads]) for n in grads[0]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fisher_signal_and_channel_groups_match_the_loop(dtype):
    model = _mlp(dtype)
    batches = [_data(dtype, 9, 1), _data(dtype, 4, 2), _data(dtype, 7, 3)]
    fc = FisherCollector(model, "empirical", "classification")
    for x, y in batches:
        fc.collect(x, y)
    g = _reference(model, batches)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-7}
    for name, per_unit in g.items():
        torch.testing.assert_close(fc.fisher()[name].double(), per_unit.square().mean(0), **tol)
        torch.testing.assert_close(fc.mean_gradient()[name].double(), per_unit.mean(0), **tol)
    traces, masks = fc.group_fisher("trace"), fc.group_fisher("mask")
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    for layer, out in (("0", 5), ("2", 3)):
        gw, gb = g[f"{layer}.weight"], g[f"{layer}.bias"]
        trace = (gw.square().sum(2) + gb.square()).mean(0)
        lin = (gw * params[f"{layer}.weight"]).sum(2) + gb * params[f"{layer}.bias"]
        family = next(f for f in traces if f.startswith(layer) or f"{layer}." in f)
        assert traces[family].shape == (out,)
        torch.testing.assert_close(traces[family].double(), trace, **tol)
        torch.testing.assert_close(masks[family].double(), lin.square().mean(0), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ef_only_matches_the_loop_across_folds(dtype):
    model = _mlp(dtype)
    batches = [_data(dtype, 3, seed) for seed in range(20)]  # > FOLD_EVERY batches
    fc = FisherCollector(model, "empirical", "classification", signal=False, groups=None)
    for x, y in batches:
        fc.collect(x, y)
    g = _reference(model, batches)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-8}
    for name, per_unit in g.items():
        torch.testing.assert_close(fc.fisher()[name].double(), per_unit.square().mean(0), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_overflowing_product_is_skipped_and_changes_nothing(dtype):
    torch.manual_seed(0)
    model = nn.Linear(6, 3).to(dtype)
    fc = FisherCollector(model, "empirical", "classification", signal=False, groups=None)
    x, y = _data(dtype)
    fc.collect(x, y)
    before = {n: v.clone() for n, v in fc.fisher("none").items()}
    big = 0.9 * torch.finfo(dtype).max ** 0.5  # finite inputs and loss; a² overflows
    fc.collect(x * big, y)
    assert fc.counts["skipped"] == 1
    with pytest.warns(RuntimeWarning, match="skipped"):
        after = fc.fisher("none")
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0)


def test_hook_signal_equals_autograd_gradient_of_a_sequence_model():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    model = nn.Sequential(lin)
    x = torch.randn(5, 7, 4, dtype=torch.float64)
    y = torch.randn(5, 7, 3, dtype=torch.float64)

    def loss(out, target):
        return 0.5 * (out - target).square().sum((1, 2))

    fc = FisherCollector(model, "empirical", loss)
    fc.collect(x, y)
    total = 0.5 * (model(x) - y).square().sum()
    grads = torch.autograd.grad(total, list(model.parameters()))
    for (name, _), grad in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(fc.mean_gradient()[name] * 5, grad)
