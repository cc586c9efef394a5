"""The one non-finite policy: ``nonfinite="skip"|"raise"`` and the ``skipped`` counter."""

import pytest
import torch

from gradstats.errors import ConfigurationError, NonFiniteError
from gradstats.moments import EMAMoments, RunningMoments
from gradstats.testing import assert_state_equal

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([[1.0, NAN], [0.0, 0.0]]),
        torch.tensor([[INF, 1.0]]),
        torch.tensor([[-INF, 1.0]]),
        torch.tensor([[1e200, 0.0], [-1e200, 0.0]]),  # squared deviations overflow float64
    ],
    ids=["nan", "inf", "-inf", "overflow"],
)
def test_running_moments_raise_policy_changes_nothing(bad):
    rm = RunningMoments(2, nonfinite="raise").update(torch.tensor([[1.0, 2.0], [3.0, 5.0]]))
    before = rm.state_dict()
    with pytest.raises(NonFiniteError, match="nonfinite='raise'") as info:
        rm.update(bad)
    assert isinstance(info.value, FloatingPointError)
    assert_state_equal(rm.state_dict(), before)


def test_running_moments_raise_policy_accepts_finite_data_and_masked_out_nan():
    rm = RunningMoments(nonfinite="raise")
    rm.update(torch.tensor([1.0, NAN, 3.0]), mask=torch.tensor([True, False, True]))
    assert rm.mean.item() == 2.0
    assert rm.skipped.item() == 0


def test_running_moments_accept_false_is_a_skip_under_either_policy():
    rm = RunningMoments(nonfinite="raise").update(torch.tensor([1.0]))
    rm.update(torch.tensor([5.0]), accept=torch.tensor(False))
    assert (rm.count.item(), rm.skipped.item()) == (1, 1)


def test_running_moments_refused_nan_batch_is_a_skip_under_raise():
    """accept=False wins over nonfinite='raise': the caller already refused the batch."""
    rm = RunningMoments(nonfinite="raise").update(torch.tensor([1.0]))
    rm.update(torch.tensor([NAN]), accept=torch.tensor(False))
    assert (rm.count.item(), rm.skipped.item()) == (1, 1)


def test_running_moments_skip_is_the_default():
    rm = RunningMoments()
    assert rm.nonfinite == "skip"
    rm.update(torch.tensor([NAN]))
    assert rm.skipped.item() == 1


def test_rejected_is_a_deprecated_alias_of_skipped():
    rm = RunningMoments().update(torch.tensor([NAN]))
    with pytest.warns(FutureWarning, match="use RunningMoments.skipped") as record:
        value = rm.rejected
    assert value is rm.skipped
    assert record[0].filename == __file__  # attributed to the caller's line


def test_state_dict_names_the_counter_skipped():
    state = RunningMoments().update(torch.tensor([NAN])).state_dict()
    assert "rejected" not in state
    assert state["skipped"].item() == 1


def test_an_old_state_dict_with_rejected_still_loads():
    source = RunningMoments(3).update(torch.randn(4, 3)).update(torch.full((1, 3), NAN))
    old = source.state_dict()
    old["rejected"] = old.pop("skipped")
    loaded = RunningMoments(3)
    loaded.load_state_dict(old)
    assert_state_equal(loaded.state_dict(), source.state_dict())


def test_merge_and_reset_carry_the_skipped_counter():
    a = RunningMoments().update(torch.tensor([NAN]))
    b = RunningMoments().update(torch.tensor([INF])).update(torch.tensor([1.0]))
    assert a.merge(b).skipped.item() == 2
    assert a.reset().skipped.item() == 0


@pytest.mark.parametrize("bad", [NAN, INF, -INF, 1e200], ids=["nan", "inf", "-inf", "overflow"])
def test_ema_raise_policy_changes_nothing(bad):
    ema = EMAMoments(beta=0.9, shape=2, nonfinite="raise").update(torch.tensor([1.0, 2.0]))
    before = ema.state_dict()
    with pytest.raises(NonFiniteError, match="nonfinite='raise'"):
        ema.update(torch.tensor([bad, 0.0]))
    assert_state_equal(ema.state_dict(), before)


@pytest.mark.parametrize("skip", [True, torch.tensor(True)], ids=["bool", "tensor"])
def test_ema_raise_policy_lets_an_explicit_skip_through(skip):
    ema = EMAMoments(beta=0.9, nonfinite="raise").update(torch.tensor(1.0))
    ema.update(torch.tensor(NAN), skip=skip)  # e.g. an AMP overflow step: skipped, not raised
    assert (ema.count.item(), ema.skipped.item()) == (1, 1)


def test_ema_skip_policy_counts_non_finite_updates():
    ema = EMAMoments(beta=0.9).update(torch.tensor(1.0)).update(torch.tensor(NAN))
    assert ema.nonfinite == "skip"
    assert (ema.count.item(), ema.skipped.item()) == (1, 1)


@pytest.mark.parametrize("make", [RunningMoments, EMAMoments], ids=["running", "ema"])
@pytest.mark.parametrize("device", ["bogus", "cuda:99"])
def test_moving_to_an_unusable_device_changes_nothing(make, device):
    stats = make()
    before = stats.state_dict()
    with pytest.raises(ConfigurationError, match=f"device '{device}' is not usable here"):
        stats.to(device)
    assert stats.device == torch.device("cpu")
    assert_state_equal(stats.state_dict(), before)
