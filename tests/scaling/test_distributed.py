"""Under DDP every rank computes the same factor, deterministically, with one small all-reduce."""

import torch

from gradstats import VarianceGradientScaler
from gradstats.scaling import optimizer_step
from gradstats.testing import run_gloo


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g, dtype=torch.float64).float()
    y = torch.sin(x.sum(1, keepdim=True))
    return x, y


def _train_rank(rank, world_size, statistic, wrap_after):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"statistic": statistic, "rule": "shrink", "beta": 0.8, "confidence": None}
    kwargs["optimizer"] = opt
    if wrap_after:  # the scaler is built first, DDP wraps the model afterwards
        vgs = VarianceGradientScaler(model.named_parameters(), **kwargs)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    else:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        vgs = VarianceGradientScaler(model.named_parameters(), **kwargs)
    x, y = _problem()
    factors = []
    for step in range(6):
        rows = torch.arange(step * 32, (step + 1) * 32).chunk(world_size)[rank]
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x[rows]), y[rows]).backward()
        optimizer_step(opt, vgs)
        factors.append(vgs.scaling_factors()[0].clone())
    return {"factors": torch.stack(factors), "weight": model[0].weight.detach().clone()}


def test_temporal_factor_is_identical_on_every_rank():
    results = run_gloo(_train_rank, 2, ("temporal", False))
    assert torch.equal(results[0]["factors"], results[1]["factors"])
    assert torch.equal(results[0]["weight"], results[1]["weight"])
    assert (results[0]["factors"][2:] < 1).all()


def test_same_point_with_ddp_wrapped_after_the_scaler():
    results = run_gloo(_train_rank, 2, ("same_point", True))
    assert torch.equal(results[0]["factors"], results[1]["factors"])
    assert (results[0]["factors"][1:] < 1).all()  # ranks are micro-batches: estimates from step 1
