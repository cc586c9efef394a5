"""The per_sample cost floor computes what the statistic needs (else it is no floor): the
per-example Σ_i ‖c_i‖² of every weight and bias and ‖ĝ‖² of every gradient, against a float64
per-example autograd loop."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstats.bench.suites._scaling_floors import per_sample_floor


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_floor_gives_the_per_example_sums_and_gradient_norms(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)
    x, y = torch.randn(7, 6, dtype=dtype), torch.randint(0, 3, (7,))
    tol = {"rtol": 1e-12 if dtype == torch.float64 else 1e-5, "atol": 0.0}

    def loss(m: nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(x), y)

    sums, sq = per_sample_floor(copy.deepcopy(model), loss, 7)()
    params = list(model.parameters())  # weight 0, bias 0, weight 1, bias 1
    per_example = torch.zeros(len(params), dtype=dtype)
    for i in range(7):  # c_i = ∇(loss_i / B): the share of example i in .grad
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) / 7, params)
        per_example += torch.stack([g.square().sum() for g in grads])
    full = torch.autograd.grad(loss(model), params)
    per_example = per_example.to(torch.float64)
    torch.testing.assert_close(sums[0], per_example[0::2], **tol)  # weights
    torch.testing.assert_close(sums[1], per_example[1::2], **tol)  # biases
    norms = torch.stack([g.double().square().sum() for g in full])
    torch.testing.assert_close(sq, norms, **tol)
