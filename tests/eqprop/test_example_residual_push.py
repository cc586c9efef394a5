"""examples/eqprop_residual_push.py: the residual penalty's gradient at fixed points of a run."""

from __future__ import annotations

import math

import pytest
import torch

from gradstats.eqprop.train import TrainConfig, train
from tests._scripts import load_example


@pytest.mark.filterwarnings("ignore::gradstats.eqprop.ConvergenceWarning")
def test_it_reads_a_run_and_measures_the_push(tmp_path, data, no_plot, capsys):
    example = load_example("eqprop_residual_push")
    cfg = TrainConfig(method="bptt", steps=2, out=tmp_path / "run", data=data, d_model=16,
                      n_heads=2, block_size=12, batch_size=2, t1=8, progress=False)  # fmt: skip
    train(cfg)
    found = example.main([str(tmp_path / "run"), "--batch", "2"])
    assert set(found) == {"f32_f64", "f32_f32"}
    assert all(math.isfinite(v) and -1 <= v <= 1 + 1e-12 for v in found.values())
    assert len(capsys.readouterr().out.splitlines()) == 4


@pytest.mark.filterwarnings("ignore::gradstats.eqprop.ConvergenceWarning")  # 3 steps on purpose
def test_the_push_is_the_gradient_of_half_the_squared_residual():
    example = load_example("eqprop_residual_push")
    from gradstats.eqprop.models import TanhModel

    torch.manual_seed(0)
    model = TanhModel.random(6, 3, 2, generator=torch.Generator().manual_seed(1)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    value, grad, worst = example.residual_push(model, x, 1e-3, max_steps=3)
    z = torch.zeros(4, 6, dtype=torch.float64)
    for _ in range(3):  # the same relaxation by hand: the default step of TanhModel
        z = z + model.solver_defaults["step_size"] * model.force(z, x)
    f = model.force(z.detach(), x)
    truth = 0.5 * (f * f).sum() / 4
    grads = torch.autograd.grad(truth, list(model.parameters()), allow_unused=True)
    params = list(model.parameters())
    flat = torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for p, g in zip(params, grads, strict=True)
        ]
    )
    torch.testing.assert_close(torch.tensor(value, dtype=torch.float64), truth.detach())
    torch.testing.assert_close(grad, flat)
    assert worst > 0


def test_a_backprop_run_is_refused_with_one_line(tmp_path, data, no_plot):
    example = load_example("eqprop_residual_push")
    cfg = TrainConfig(method="backprop", steps=1, out=tmp_path / "bp", data=data, d_model=16,
                      n_heads=2, block_size=12, batch_size=2, progress=False)  # fmt: skip
    train(cfg)
    with pytest.raises(SystemExit, match="is a BackpropTransformer run"):
        example.main([str(tmp_path / "bp")])
