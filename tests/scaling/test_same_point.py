"""Same-point noise from micro-batches of one step (hooks, no extra backward) and DDP ranks."""

import pytest
import torch

from gradstats import VarianceGradientScaler
from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.scaling import two_batch_estimates
from gradstats.testing import reference_two_batch, run_gloo


def test_two_batch_golden_values():
    """E‖g_s‖² = 9, E‖g_b‖² = 2, B_s = 8, B_b = 64 → ‖G‖² = 1, tr Σ = 64, B_simple = 64."""
    noise, signal = two_batch_estimates(torch.tensor(9.0), torch.tensor(2.0), torch.tensor(8.0))
    big_batch = 64
    assert signal.item() == 1.0
    assert noise.item() * big_batch == 64.0  # noise estimates tr Cov(g_b) = tr Σ / B_b
    assert noise.item() * big_batch / signal.item() == 64.0


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    return x, x @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)


def _micro_grads(model, x, y, parts):
    grads = []
    for xs, ys in zip(x.chunk(parts), y.chunk(parts), strict=True):
        loss = torch.nn.functional.mse_loss(model(xs).squeeze(1), ys)
        grads.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
        )
    return grads


@pytest.mark.parametrize("divide", [True, False])
def test_micro_batch_hooks_match_the_explicit_two_batch_estimate(divide):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x, y = _data()
    vgs = VarianceGradientScaler(
        model.named_parameters(), statistic="same_point", beta=0.5, confidence=None, rule="shrink"
    )
    parts = 6
    for xs, ys in zip(x.chunk(parts), y.chunk(parts), strict=True):
        loss = torch.nn.functional.mse_loss(model(xs).squeeze(1), ys)
        (loss / parts if divide else loss).backward()
    vgs.step()
    ref = reference_two_batch(_micro_grads(model, x, y, parts))
    stats = vgs.statistics()["global"]
    scale = 1.0 if divide else parts**2  # summed losses: all values in units of .grad
    assert stats.variance_unbiased == pytest.approx(ref["noise"] * scale, rel=1e-10)
    assert stats.signal_unbiased == pytest.approx(ref["signal"] * scale, rel=1e-10)
    assert vgs.get_normalized_variance() == pytest.approx(ref["noise"] / ref["signal"], rel=1e-10)


def test_explicit_observe_equals_hooks():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x, y = _data()
    hooks = VarianceGradientScaler(
        model.named_parameters(), statistic="same_point", confidence=None, rule="shrink"
    )
    for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
        (torch.nn.functional.mse_loss(model(xs).squeeze(1), ys) / 4).backward()
    hooks.step()
    grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    hooks.remove_hooks()
    explicit = VarianceGradientScaler(
        model.named_parameters(), statistic="same_point", confidence=None, rule="shrink"
    )
    with explicit.paused():
        for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
            loss = torch.nn.functional.mse_loss(model(xs).squeeze(1), ys) / 4
            explicit.observe(
                dict(zip(grad, torch.autograd.grad(loss, list(model.parameters())), strict=True))
            )
    for n, p in model.named_parameters():
        p.grad = grad[n].clone()
    explicit.update_statistics()
    assert explicit.get_normalized_variance() == pytest.approx(
        hooks.get_normalized_variance(), rel=1e-12
    )


def test_one_micro_batch_gives_no_estimate():
    model = torch.nn.Linear(5, 1)
    x, y = _data()
    vgs = VarianceGradientScaler(model.named_parameters(), statistic="same_point", rule="shrink")
    torch.nn.functional.mse_loss(model(x).squeeze(1), y).backward()
    vgs.step()
    assert vgs.statistics()["global"].no_estimate
    assert vgs.get_scaling_factor() == 1.0


def test_estimates_are_unbiased_at_a_fixed_point():
    """Micro-batches drawn with replacement at fixed θ: the EMAs match tr Σ/B_b and ‖G‖²."""
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 1)
    x, y = _data(200, seed=2)
    per_sample = torch.stack(_micro_grads(model, x, y, len(x)))
    true_signal = per_sample.mean(0).square().sum().item()
    parts, size = 4, 8
    true_noise = per_sample.var(0, unbiased=False).sum().item() / (parts * size)
    vgs = VarianceGradientScaler(
        model.named_parameters(), statistic="same_point", beta=0.999, confidence=None, rule="shrink"
    )
    g = torch.Generator().manual_seed(3)
    for _ in range(600):
        model.zero_grad()
        for _ in range(parts):
            rows = torch.randint(0, len(x), (size,), generator=g)
            (torch.nn.functional.mse_loss(model(x[rows]).squeeze(1), y[rows]) / parts).backward()
        vgs.step()
    stats = vgs.statistics()["global"]
    assert stats.variance_unbiased == pytest.approx(true_noise, rel=0.1)
    assert stats.signal_unbiased == pytest.approx(true_signal, rel=0.1)


def test_paused_backward_passes_are_not_recorded():
    model = torch.nn.Linear(5, 1)
    x, y = _data()
    vgs = VarianceGradientScaler(model.named_parameters(), statistic="same_point", rule="shrink")
    with vgs.paused():
        torch.nn.functional.mse_loss(model(x).squeeze(1), y).backward()
    torch.nn.functional.mse_loss(model(x).squeeze(1), y).backward()
    vgs.step()
    assert vgs.statistics()["global"].no_estimate  # only one recorded pass


@pytest.mark.parametrize(
    ("grads", "error", "match"),
    [
        ([torch.zeros(1, 5)], ConfigurationError, "one entry per tracked tensor"),
        ({"head.weight": torch.zeros(1)}, ConfigurationError, "does not track"),
        (torch.zeros(2), ConfigurationTypeError, "a dict by parameter name or a list"),
        (3, ConfigurationTypeError, "a dict by parameter name or a list in params order; got int"),
    ],
)
def test_observe_rejects_bad_input(grads, error, match):
    model = torch.nn.Linear(5, 1)
    vgs = VarianceGradientScaler(model.named_parameters(), statistic="same_point", rule="shrink")
    with pytest.raises(error, match=match):
        vgs.observe(grads)


def test_observe_needs_the_same_point_statistic():
    model = torch.nn.Linear(5, 1)
    temporal = VarianceGradientScaler(model.named_parameters(), statistic="temporal", rule="shrink")
    with pytest.raises(RuntimeError, match="same_point"):
        temporal.observe([None, None])


def _float32_problem():
    """Spawned ranks do not share the tests' float64 default: build everything in float32."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1, dtype=torch.float32)
    x, y = _data()
    return model, x.float(), y.float()


def _ddp_rank(rank, world_size):
    model, x, y = _float32_problem()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    vgs = VarianceGradientScaler(
        model.named_parameters(), statistic="same_point", beta=0.5, confidence=None, rule="shrink"
    )
    xs, ys = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
    for half in range(2):  # two micro-batches per rank, DDP syncs on the last one
        xm, ym = xs.chunk(2)[half], ys.chunk(2)[half]
        loss = torch.nn.functional.mse_loss(ddp(xm).squeeze(1), ym) / 2
        if half == 0:
            with ddp.no_sync():
                loss.backward()
        else:
            loss.backward()
    vgs.step()
    return {
        "rho": torch.tensor(vgs.get_normalized_variance()),
        "factor": torch.tensor(vgs.get_scaling_factor()),
    }


def test_ddp_ranks_give_the_same_point_estimate_of_all_micro_batches():
    results = run_gloo(_ddp_rank, world_size=2)
    model, x, y = _float32_problem()
    ref = reference_two_batch(_micro_grads(model, x, y, 4))
    for result in results:
        assert result["rho"].item() == pytest.approx(
            ref["noise"] / ref["signal"], rel=1e-5
        )  # float32
    assert torch.equal(results[0]["factor"], results[1]["factor"])


def test_autograd_grad_calls_are_not_micro_batches():
    """Only contributions that reach .grad count: a torch.autograd.grad probe between the
    micro-batch backwards (a gradient penalty, per-sample gradients) leaves ρ unchanged."""
    x, y = _data()
    values = []
    for probe in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 1)
        vgs = VarianceGradientScaler(
            model.named_parameters(), statistic="same_point", confidence=None, rule="shrink"
        )
        for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
            (torch.nn.functional.mse_loss(model(xs).squeeze(1), ys) / 4).backward()
            if probe:
                for row in range(3):
                    loss = torch.nn.functional.mse_loss(model(xs[row : row + 1]).squeeze(1), ys[:1])
                    torch.autograd.grad(loss, list(model.parameters()))
        vgs.step()
        values.append(vgs.get_normalized_variance())
    assert values[1] == values[0]
