"""No host sync in step()/update_statistics()/scale_gradients() (needs a CUDA device)."""

import pytest
import torch

from gradstats import VarianceGradientScaler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("statistic", ["temporal", "same_point", "tensor_mean"])
@pytest.mark.parametrize("aggregate", ["global", "tensor"])
def test_hot_path_never_syncs(statistic, aggregate):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    ).cuda()
    vgs = VarianceGradientScaler(
        model.named_parameters(), statistic=statistic, aggregate=aggregate, log_every=10**6,
        max_nonfinite_steps=None, batch_size=8, rule="shrink",
    )  # fmt: skip
    x = torch.randn(8, 16, device="cuda")

    def one_step():
        model.zero_grad()
        for _ in range(2):  # two micro-batches (same_point needs them)
            model(x).square().mean().backward()
        vgs.step()
        vgs.scale_gradients()

    one_step()  # first step builds cached index masks (one host-to-device copy each)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            one_step()
        vgs.update_statistics(skip=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert 0.0 <= vgs.get_scaling_factor() <= 1.0  # explicit host read, outside the check


@pytest.mark.parametrize("statistic", ["temporal", "same_point"])
def test_max_nonfinite_steps_reads_only_at_its_scheduled_updates(statistic):
    """With the default limit the counters are read once every N updates, never in between."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).cuda()
    vgs = VarianceGradientScaler(
        model.named_parameters(),
        statistic=statistic,
        max_nonfinite_steps=5,
        log_every=10**6,
        rule="shrink",
    )
    x = torch.randn(8, 16, device="cuda")

    def one_step():
        model.zero_grad()
        for _ in range(2):
            model(x).square().mean().backward()
        vgs.step()

    one_step()  # builds the cached masks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # updates 2..4: c <= 4 < 5 without a read
            one_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    one_step()  # update 5: the scheduled read
    assert vgs.updates == 5
