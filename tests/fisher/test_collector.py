"""Streaming statistics of the collector: splits, merges, decomposition, EMA, skipping, dtypes."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gradstats.errors import ConfigurationError, ConfigurationTypeError, StateError
from gradstats.fisher import FisherCollector
from gradstats.testing import per_sample_gradients, reference_ema, reference_fisher
from tests.fisher.models import mlp

X = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(1))
MODEL = mlp((3, 5, 4)).double()


def _collector(**kwargs):
    return FisherCollector(MODEL, "empirical", "classification", element_se=True, **kwargs)


def _assert_same(a: FisherCollector, b: FisherCollector) -> None:
    for name, value in a.fisher().items():
        torch.testing.assert_close(value, b.fisher()[name])
        torch.testing.assert_close(a.standard_error()[name], b.standard_error()[name])
        torch.testing.assert_close(a.mean_gradient()[name], b.mean_gradient()[name])
    for kind in ("trace", "mask"):
        for fam, value in a.group_fisher(kind).items():
            torch.testing.assert_close(value, b.group_fisher(kind)[fam])
        for fam, value in a.group_standard_error(kind).items():
            torch.testing.assert_close(value, b.group_standard_error(kind)[fam])
    ignore = ("batches", "skipped")
    assert {k: v for k, v in a.counts.items() if k not in ignore} == {
        k: v for k, v in b.counts.items() if k not in ignore
    }


ONE_CALL = _collector().collect(X, Y)


@given(st.lists(st.integers(1, 12), min_size=1, max_size=12))
def test_any_split_into_collect_calls_equals_one_call(sizes):
    fc = _collector()
    start = 0
    for size in sizes:
        if start >= 12:
            break
        fc.collect(X[start : start + size], Y[start : start + size])
        start += size
    if start < 12:
        fc.collect(X[start:], Y[start:])
    _assert_same(fc, ONE_CALL)


@given(st.permutations(range(4)), st.lists(st.integers(1, 3), min_size=4, max_size=4))
def test_merge_in_any_order_equals_one_call(order, sizes):
    bounds = [0, *itertools.accumulate(sizes)]
    bounds = [round(b * 12 / bounds[-1]) for b in bounds]
    shards = []
    for lo, hi in itertools.pairwise(bounds):
        shard = _collector()
        if hi > lo:
            shard.collect(X[lo:hi], Y[lo:hi])
        shards.append(shard)
    merged = shards[order[0]]
    for index in order[1:]:
        merged.merge(shards[index])
    _assert_same(merged, ONE_CALL)


def test_reference_values_and_the_decomposition():
    per_sample = per_sample_gradients(MODEL, X, Y)
    for name, g in per_sample.items():
        torch.testing.assert_close(ONE_CALL.fisher()[name], g.square().mean(0))
        torch.testing.assert_close(ONE_CALL.mean_gradient()[name], g.mean(0))
        torch.testing.assert_close(ONE_CALL.signal()[name], g.mean(0).square())
        torch.testing.assert_close(ONE_CALL.variance()[name], g.var(0, correction=0))
        # EF = ḡ² + Var
        torch.testing.assert_close(
            ONE_CALL.fisher()[name], ONE_CALL.signal()[name] + ONE_CALL.variance()[name]
        )
        torch.testing.assert_close(ONE_CALL.standard_error()[name], g.square().std(0) / 12**0.5)
        torch.testing.assert_close(
            ONE_CALL.mean_gradient_standard_error()[name], g.std(0) / 12**0.5
        )


@pytest.mark.parametrize("name", ["0.weight", "0.bias", "2.weight", "2.bias"])
def test_normalizations(name):
    fc = ONE_CALL
    torch.testing.assert_close(fc.fisher("none")[name] / 12, fc.fisher()[name])
    torch.testing.assert_close(fc.fisher("sample")[name], fc.fisher()[name])


def _skip_counters_removed(state: dict) -> dict:
    tensors = {k: v for k, v in state["tensors"].items() if not k.endswith("/skipped")}
    counts = {k: v for k, v in state["spec"]["counts"].items() if k != "skipped"}
    return {"spec": state["spec"] | {"counts": counts}, "tensors": tensors}


def test_nan_batch_is_skipped_counted_and_changes_nothing_else():
    fc = _collector().collect(X[:6], Y[:6])
    before = fc.state_dict()
    bad = X[6:].clone()
    bad[0, 0] = float("nan")
    fc.collect(bad, Y[6:])
    assert fc.counts["skipped"] == 1
    assert int(fc.skipped) == 1
    assert fc.counts["batches"] == 1
    assert fc.counts["samples"] == 6
    after = _skip_counters_removed(fc.state_dict())
    expected = _skip_counters_removed(before)
    assert after["spec"] == expected["spec"]
    assert after["tensors"].keys() == expected["tensors"].keys()
    for key, value in expected["tensors"].items():
        torch.testing.assert_close(after["tensors"][key], value, rtol=0, atol=0)
    fc.collect(X[6:], Y[6:])
    with pytest.warns(RuntimeWarning, match=r"1 batch\(es\) were skipped as non-finite"):
        _assert_same(fc, ONE_CALL)


def test_a_failing_batch_leaves_the_state_unchanged():
    fc = _collector().collect(X[:6], Y[:6])
    before = fc.state_dict()
    with pytest.raises(ConfigurationError, match="targets must have shape"):
        fc.collect(X[6:], Y[:3])
    after = fc.state_dict()
    assert after["spec"] == before["spec"]
    for key, value in before["tensors"].items():
        torch.testing.assert_close(after["tensors"][key], value, rtol=0, atol=0)
    fc.collect(X[6:], Y[6:])
    _assert_same(fc, ONE_CALL)


def test_ema_mode_is_debiased():
    # the g = [1, -1, 2, 4] regression: every batch has mean g² = 5.5, read exactly from k = 1
    model = nn.Linear(1, 1, bias=False).double()
    model.weight.data.fill_(1.0)
    x, y = torch.ones(4, 1), torch.tensor([[0.0], [2.0], [-1.0], [-3.0]])
    fc = FisherCollector(model, "empirical", "regression", mode="ema", beta=0.9)
    for _ in range(3):
        fc.collect(x, y)
        torch.testing.assert_close(fc.fisher()["weight"], torch.tensor([[5.5]]))
    # varying batches: the debiased EMA of the batch means of g²
    fc = FisherCollector(MODEL, "empirical", "classification", mode="ema", beta=0.8)
    batch_means = []
    for lo in range(0, 12, 3):
        fc.collect(X[lo : lo + 3], Y[lo : lo + 3])
        batch_means.append(reference_fisher(MODEL, X[lo : lo + 3], Y[lo : lo + 3]))
    for name, value in fc.fisher().items():
        expected = reference_ema([m[name] for m in batch_means], 0.8)["mean"]
        torch.testing.assert_close(value, expected)


def test_ema_mode_cannot_merge_or_save(tmp_path):
    a = FisherCollector(MODEL, mode="ema").collect(X, Y)
    with pytest.raises(ConfigurationError, match="mode='ema' collectors do not merge"):
        a.merge(FisherCollector(MODEL, mode="ema").collect(X, Y))
    with pytest.raises(ConfigurationError, match="mode='ema' collectors are not saved"):
        a.save(tmp_path / "f.safetensors")


def test_batch_grad_sq_is_the_biased_mistake():
    # over all batches of m = 2 of N = 6 samples: E[(ḡ_B)²] = μ² + σ²/m · (N − m)/(N − 1)
    x, y = X[:6], Y[:6]
    fc = FisherCollector(MODEL, "batch_grad_sq", "classification", groups=None)
    for pair in itertools.combinations(range(6), 2):
        fc.collect(x[list(pair)], y[list(pair)])
    per_sample = per_sample_gradients(MODEL, x, y)
    for name, g in per_sample.items():
        mu, var = g.mean(0), g.var(0, correction=0)
        torch.testing.assert_close(fc.fisher()[name], mu.square() + var / 2 * 4 / 5)
    assert fc.spec()["estimand"].startswith("(1/#batches)")
    assert FisherCollector(MODEL).kind == "empirical"  # never the default


def test_batch_grad_sq_has_no_mask_quantity():
    fc = FisherCollector(MODEL, "batch_grad_sq", "classification").collect(X, Y)
    with pytest.raises(ConfigurationError, match="no per-unit values"):
        fc.group_fisher("mask")


def test_half_precision_is_upcast_before_squaring():
    # gradients ~1e-5 square to ~1e-10, below float16's smallest subnormal (6e-8)
    model = nn.Linear(3, 2).half()
    with torch.no_grad():
        model.weight.mul_(1e-3)
    x = (torch.randn(4, 3) * 1e-3).half()
    y = torch.zeros(4, 2, dtype=torch.half)
    fc = FisherCollector(model, "empirical", "regression").collect(x, y)
    fisher = fc.fisher()
    assert fisher["weight"].dtype == torch.float32
    assert (fisher["weight"] > 0).all()
    expected = {
        n: g.double().square().mean(0)
        for n, g in per_sample_gradients(model, x, y, likelihood="regression").items()
    }
    for name, value in fisher.items():
        torch.testing.assert_close(value.double(), expected[name], rtol=2e-2, atol=0)  # fp16 grads


def test_bfloat16_model_gives_float32_results():
    model = mlp((3, 5, 4)).to(torch.bfloat16)
    fc = FisherCollector(model).collect(X.to(torch.bfloat16), Y)
    reference = reference_fisher(model, X.to(torch.bfloat16), Y)
    for name, value in fc.fisher().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(
            value.double(), reference[name], rtol=5e-2, atol=1e-6
        )  # bf16 forward


def test_collect_loader_formats_and_until_rel_se():
    batches = [(X[i : i + 2], Y[i : i + 2]) for i in range(0, 12, 2)]
    fc = _collector().collect_loader(batches, progress=False)
    _assert_same(fc, ONE_CALL)
    stopped = _collector().collect_loader(
        itertools.cycle(batches), until_rel_se=0.5, progress=False, max_batches=500
    )
    rel = stopped.relative_standard_error()
    assert max(float(v.max()) for v in rel.values()) < 0.5
    assert 2 <= stopped.counts["batches"] < 500
    tensors = FisherCollector(MODEL, "exact").collect_loader([X[:4], X[4:]], progress=False)
    assert tensors.counts["samples"] == 12


def test_collect_loader_rejects_unknown_batches():
    with pytest.raises(ConfigurationTypeError, match="a loader batch must be"):
        _collector().collect_loader([3], progress=False)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"until_rel_se": -1}, "until_rel_se must be a positive number"),
        ({"until_rel_se": True}, "until_rel_se must be a positive number"),
        ({"max_batches": -1}, "max_batches must be a non-negative int"),
        ({"max_batches": 2.5}, "max_batches must be a non-negative int"),
        ({"min_batches": 0}, "min_batches must be an int >= 1"),
        ({"until_rel_se": 0.1, "se_kind": "sum"}, "kind must be one of 'trace', 'mask'"),
        ({"until_rel_se": 0.1, "families": ["nope"]}, "families: unknown"),
        ({"until_rel_se": 0.1, "families": "0"}, "families must be a list"),
        ({"until_rel_se": 0.1, "distributed": True}, "cannot be combined with distributed"),
    ],
)
def test_collect_loader_rejects_bad_options_before_any_work(options, match):
    fc = _collector()
    with pytest.raises(ConfigurationError, match=match):
        fc.collect_loader([(X, Y)], progress=False, **options)
    assert fc.counts["batches"] == 0


def test_merge_refuses_different_estimands_and_changes_nothing():
    fc = _collector().collect(X, Y)
    before = fc.state_dict()
    with pytest.raises(StateError, match="cannot merge collectors with different kind"):
        fc.merge(FisherCollector(MODEL, "exact", element_se=False).collect(X))
    after = fc.state_dict()
    assert after["spec"] == before["spec"]
    for key, value in before["tensors"].items():
        torch.testing.assert_close(after["tensors"][key], value, rtol=0, atol=0)


def test_merge_refuses_other_parameters():
    other = FisherCollector(mlp((3, 6, 4)).double(), "empirical", element_se=True)
    with pytest.raises(StateError, match=r"different parameters \(names or shapes\)"):
        _collector().merge(other.collect(X, Y))


def test_merge_refuses_other_group_families():
    other = FisherCollector(MODEL, "empirical", element_se=True, groups=None).collect(X, Y)
    with pytest.raises(StateError, match="different group families"):
        _collector().collect(X, Y).merge(other)


def test_merge_refuses_what_is_not_a_collector():
    with pytest.raises(
        ConfigurationTypeError, match="other must be a FisherCollector or a FisherResult; got int"
    ):
        _collector().merge(3)


EXACT = FisherCollector(MODEL, "exact", groups=None).collect(X)


@pytest.mark.parametrize(
    ("read", "match"),
    [
        (lambda fc: fc.standard_error(), "elementwise standard errors need element_se=True"),
        (lambda fc: fc.signal(), "the mean gradient was not collected"),
        (lambda fc: fc.group_fisher(), "no group map"),
        (lambda fc: fc.fisher("batch"), "normalization must be one of 'unit', 'sample'"),
        (lambda fc: fc.fisher(dtype=None, normalization=3), "normalization must be one of"),
    ],
)
def test_reads_that_were_not_collected_are_clear_errors(read, match):
    with pytest.raises(ConfigurationError, match=match):
        read(EXACT)


def test_close_removes_the_hooks():
    model = mlp((3, 5, 4))
    fc = FisherCollector(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 2
    fc.close()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    with pytest.raises(ConfigurationError, match="no model hooks"):
        fc.collect(X, Y)


def test_params_selects_a_subset():
    fc = FisherCollector(MODEL, params=["2.weight"], groups=None).collect(X, Y)
    assert list(fc.fisher()) == ["2.weight"]
    torch.testing.assert_close(fc.fisher()["2.weight"], ONE_CALL.fisher()["2.weight"])
