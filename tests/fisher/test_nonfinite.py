"""The non-finite policy of FisherCollector: nonfinite="skip" | "raise", the skipped count, the
read warning, and reads that never return NaN because of skipped batches."""

from __future__ import annotations

import warnings

import pytest
import torch

from gradstats.errors import ConfigurationError, NonFiniteError, StateError
from gradstats.fisher import FisherCollector
from tests.fisher.models import mlp

X = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(1))
MODEL = mlp((3, 5, 4)).double()
BAD = X[6:].clone()
BAD[0, 0] = float("nan")


def _collector(kind="empirical", **kwargs):
    kwargs.setdefault("element_se", kind == "empirical")
    return FisherCollector(MODEL, kind, "classification", **kwargs)


def _same_state(a: dict, b: dict) -> None:
    assert a["spec"] == b["spec"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for key, value in b["tensors"].items():
        torch.testing.assert_close(a["tensors"][key], value, rtol=0, atol=0)


READS = {
    "fisher": lambda fc: fc.fisher(),
    "fisher none": lambda fc: fc.fisher("none"),
    "mean_gradient": lambda fc: fc.mean_gradient(),
    "signal": lambda fc: fc.signal(),
    "variance": lambda fc: fc.variance(),
    "standard_error": lambda fc: fc.standard_error(),
    "mean_gradient_standard_error": lambda fc: fc.mean_gradient_standard_error(),
    "score_check": lambda fc: fc.score_check(),
    "group trace": lambda fc: fc.group_fisher("trace"),
    "group mask": lambda fc: fc.group_fisher("mask"),
    "group_standard_error": lambda fc: fc.group_standard_error(),
    "relative_standard_error": lambda fc: fc.relative_standard_error("mask"),
}


def _with_a_skipped_batch():
    return _collector().collect(X[:6], Y[:6]).collect(BAD, Y[6:])


@pytest.mark.parametrize("read", list(READS))
def test_a_read_after_a_skipped_batch_warns_once_at_the_callers_line(read):
    fc = _with_a_skipped_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        READS[read](fc)
    skipped = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(skipped) == 1
    assert "1 batch(es) were skipped as non-finite" in str(skipped[0].message)
    assert skipped[0].filename == __file__


@pytest.mark.parametrize("read", list(READS))
def test_reads_of_a_collector_without_data_raise_instead_of_nan(read):
    with pytest.raises(StateError, match="nothing to read: the collector holds no samples"):
        READS[read](_collector())


@pytest.mark.parametrize("read", list(READS))
def test_reads_after_only_skipped_batches_raise_and_say_why(read):
    fc = _collector().collect(BAD, Y[6:])
    with (
        pytest.warns(RuntimeWarning, match="skipped as non-finite"),
        pytest.raises(StateError, match=r"holds no samples \(1 batch\(es\) skipped"),
    ):
        READS[read](fc)


@pytest.mark.parametrize("read", ["fisher", "mean_gradient", "variance", "group trace"])
def test_reads_with_skipped_batches_hold_no_nan(read):
    fc = _with_a_skipped_batch()
    with pytest.warns(RuntimeWarning):
        values = READS[read](fc)
    assert all(bool(torch.isfinite(v).all()) for v in values.values())


def test_skipped_is_a_device_tensor_and_a_count():
    fc = _with_a_skipped_batch()
    assert fc.skipped.dtype == torch.int64
    assert int(fc.skipped) == 1
    assert fc.counts["skipped"] == 1
    assert fc.counts["batches"] == 1


def test_the_old_count_name_rejected_still_reads_and_warns():
    fc = _with_a_skipped_batch()
    with pytest.warns(FutureWarning, match=r'counts\["rejected"\] is deprecated'):
        assert fc.counts["rejected"] == 1
    assert "rejected" not in fc.counts


def test_batch_grad_sq_without_batches_raises():
    fc = FisherCollector(MODEL, "batch_grad_sq", "classification", groups=None)
    with pytest.raises(StateError, match="holds no batch"):
        fc.fisher()


def test_ema_skips_non_finite_batches():
    fc = FisherCollector(MODEL, mode="ema").collect(X[:6], Y[:6])
    expected = FisherCollector(MODEL, mode="ema").collect(X[:6], Y[:6]).fisher()
    fc.collect(BAD, Y[6:])
    with pytest.warns(RuntimeWarning, match="skipped"):
        got = fc.fisher()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["empirical", "mc", "exact", "batch_grad_sq"])
def test_raise_refuses_a_non_finite_batch_before_changing_anything(kind):
    fc = _collector(kind, nonfinite="raise").collect(X[:6], Y[:6])
    before = fc.state_dict()
    with pytest.raises(NonFiniteError, match=r"nonfinite='raise'.*nothing was accumulated"):
        fc.collect(BAD, Y[6:])
    _same_state(fc.state_dict(), before)
    assert fc.counts["skipped"] == 0


def test_raise_in_ema_mode():
    fc = FisherCollector(MODEL, mode="ema", nonfinite="raise").collect(X[:6], Y[:6])
    before = fc.fisher()
    with pytest.raises(NonFiniteError):
        fc.collect(BAD, Y[6:])
    for name, value in before.items():
        torch.testing.assert_close(fc.fisher()[name], value, rtol=0, atol=0)


def test_raise_on_a_fourth_power_overflow():
    model = torch.nn.Linear(1, 1, bias=False).float()
    with torch.no_grad():
        model.weight.fill_(1.0)
    fc = FisherCollector(model, "empirical", "regression", element_se=True, nonfinite="raise")
    with pytest.raises(NonFiniteError):
        fc.collect(
            torch.full((2, 1), 1e12, dtype=torch.float32), torch.zeros(2, 1, dtype=torch.float32)
        )  # g⁴ ~ 1e96 overflows float32
    assert fc.counts["batches"] == 0


def test_raise_is_a_floating_point_error():
    fc = _collector(nonfinite="raise")
    with pytest.raises(FloatingPointError):
        fc.collect(BAD, Y[6:])


@pytest.mark.parametrize("value", ["ignore", None, True, "Skip"])
def test_nonfinite_must_be_skip_or_raise(value):
    with pytest.raises(ConfigurationError, match="nonfinite must be one of 'skip', 'raise'"):
        _collector(nonfinite=value)


def test_the_policy_is_in_the_spec_and_survives_a_file(tmp_path):
    fc = _collector(nonfinite="raise").collect(X, Y)
    assert fc.spec()["nonfinite"] == "raise"
    resumed = FisherCollector.load(fc.save(tmp_path / "f.safetensors"), model=MODEL)
    assert resumed.nonfinite == "raise"
    with pytest.raises(NonFiniteError):
        resumed.collect(BAD, Y[6:])
    resumed.close()
