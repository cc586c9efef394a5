"""BackPACK as an oracle: SumGradSquared (empirical, Σ_i g_i²) and DiagGGNExact (exact Fisher)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradstats.fisher import FisherCollector

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # BackPACK's hooks

backpack = pytest.importorskip("backpack")
extensions = pytest.importorskip("backpack.extensions")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 6),
        nn.Tanh(),
        nn.Linear(6, 4),
    ).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 4, (7,), generator=g
    )


def _backpack(model, x, y, extension, attribute, reduction="sum"):
    model = backpack.extend(model)
    loss = backpack.extend(nn.CrossEntropyLoss(reduction=reduction))(model(x), y)
    with backpack.backpack(extension):
        loss.backward()
    out = {n: getattr(p, attribute).detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out


def test_empirical_sum_equals_sum_grad_squared():
    model, (x, y) = _model(), _data()
    expected = _backpack(model, x, y, extensions.SumGradSquared(), "sum_grad_squared")
    fc = FisherCollector(model, "empirical", "classification", groups=None).collect(x, y)
    for name, value in fc.fisher("none").items():
        torch.testing.assert_close(value, expected[name])


def test_exact_sum_equals_diag_ggn_exact():
    model, (x, y) = _model(), _data()
    expected = _backpack(model, x, y, extensions.DiagGGNExact(), "diag_ggn_exact")
    fc = FisherCollector(model, "exact", "classification", groups=None).collect(x)
    for name, value in fc.fisher("none").items():
        torch.testing.assert_close(value, expected[name])


def test_backpack_on_a_mean_loss_gives_1_375_where_the_collector_gives_5_5():
    model = nn.Linear(1, 1, bias=False).double()
    model.weight.data.fill_(1.0)
    x, y = torch.ones(4, 1), torch.tensor([[0.0], [2.0], [-1.0], [-3.0]])  # g = [1, -1, 2, 4]
    model = backpack.extend(model)
    loss = backpack.extend(nn.MSELoss(reduction="mean"))(model(x), y) * 0.5
    with backpack.backpack(extensions.SumGradSquared()):
        loss.backward()
    assert model.weight.sum_grad_squared.item() == pytest.approx(1.375)

    def mean_loss(out, target):
        return 0.5 * nn.functional.mse_loss(out, target, reduction="mean")

    fc = FisherCollector(model, "empirical", mean_loss, loss_reduction="mean").collect(x, y)
    assert fc.fisher()["weight"].item() == pytest.approx(5.5)
