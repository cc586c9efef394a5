"""Regressions of reviewed bugs: closed-form exact Fisher, retried completeness checks, overflow
of Σg⁴, EMA batches without units, normalizations, layer-scope pruning budgets, and token-unit
group statistics. Every value is checked in float64 against the loops of gradstats.testing."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradstats.errors import ConfigurationError
from gradstats.fisher import FisherCollector, pruning_masks
from gradstats.testing import (
    labelled_gradients,
    per_sample_gradients,
    positionwise_fisher,
    reference_ema,
    reference_fisher,
    reference_group_values,
)
from gradstats.testing._fisher import causal_lm_objective


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quiet(*args, **kwargs) -> FisherCollector:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FisherCollector(*args, **kwargs)


def _per_unit(fc):
    """The families with per-unit values (group standard errors, mask quantity)."""
    return [f for f in fc.families if f.per_unit]


def _assert_group_values(fc, model, pairs, *, se=True):
    """group_fisher / group_standard_error of every per-unit family against the reference rows
    (units are the observations: SE = std(rows) / sqrt(n))."""
    params = dict(model.named_parameters())
    for fam in _per_unit(fc):
        ref = reference_group_values(pairs, params, fam)
        n = len(pairs)
        for kind in ("trace", "mask"):
            torch.testing.assert_close(fc.group_fisher(kind)[fam.name], ref[kind], msg=fam.name)
            if se:
                expected = ref[f"{kind}_rows"].std(0) / n**0.5
                torch.testing.assert_close(fc.group_standard_error(kind)[fam.name], expected)


# ------------------------------------------------------------- closed-form exact Fisher
def test_exact_output_layer_with_group_families_gives_reference_mask_and_errors():
    model = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64, generator=_gen(0))
    fc = FisherCollector(model, "exact").collect(x)
    pairs = labelled_gradients(model, x, kind="exact")
    _assert_group_values(fc, model, pairs)
    for name, value in reference_fisher(model, x, kind="exact").items():
        torch.testing.assert_close(fc.fisher()[name], value)
    rel = fc.relative_standard_error("mask")
    assert all(bool((v > 0).all()) for v in rel.values())
    # without per-unit families the closed form is used, and is exact
    closed = FisherCollector(model, "exact", groups=None).collect(x)
    assert closed._closed_form
    for name, value in reference_fisher(model, x, kind="exact").items():
        torch.testing.assert_close(closed.fisher()[name], value)


def test_until_rel_se_does_not_stop_on_zero_errors_of_the_closed_form():
    model = nn.Linear(4, 3).double()
    loader = [(torch.randn(6, 4, dtype=torch.float64, generator=_gen(i)), None) for i in range(4)]
    fc = FisherCollector(model, "exact").collect_loader(loader, until_rel_se=1e-3, progress=False)
    assert fc.counts["batches"] == 4


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class _ReadOutside(nn.Module):
    """The output Linear runs once, but its weight is also read by the parent."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.tanh(x @ self.lin.weight.T))


def test_exact_for_a_module_called_twice_equals_enumeration():
    model = _Twice().double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=_gen(1))
    fc = _quiet(model, "exact", groups=None).collect(x)
    assert not fc._closed_form
    for name, value in reference_fisher(model, x, kind="exact").items():
        torch.testing.assert_close(fc.fisher()[name], value, msg=name)
    grouped = _quiet(model, "exact").collect(x)
    _assert_group_values(grouped, model, labelled_gradients(model, x, kind="exact"))


def test_closed_form_output_layer_also_checks_completeness():
    model = _ReadOutside().double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=_gen(2))
    fc = FisherCollector(model, "exact", groups=None)
    for _ in range(2):
        with pytest.raises(ConfigurationError, match="do not add up"):
            fc.collect(x)


# ------------------------------------------------------------------ completeness retries
class _Sneaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) + x @ self.lin.weight


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_a_failed_completeness_check_is_repeated_on_retry(kind):
    model = _Sneaky().double()
    x = torch.randn(4, 3, dtype=torch.float64, generator=_gen(3))
    y = torch.tensor([0, 1, 2, 0])
    fc = FisherCollector(model, kind, groups=None)
    for _ in range(3):
        with pytest.raises(ConfigurationError, match="do not add up"):
            fc.collect(x, y if kind == "empirical" else None)
    assert fc.counts == {"samples": 0, "tokens": 0, "batches": 0, "skipped": 0, "units": 0}
    tensors = fc.state_dict()["tensors"]
    assert all(bool((v == 0).all()) for k, v in tensors.items() if k.startswith("g2_sum/"))


# --------------------------------------------------------------------- Σ g⁴ overflow
@pytest.mark.filterwarnings("ignore:1 batch:RuntimeWarning")  # reads after a skipped batch warn
def test_a_batch_whose_fourth_powers_overflow_is_skipped():
    # |g| ~ 1e80: g² ~ 1e160 is finite in float64, g⁴ ~ 1e320 is not
    model = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64, generator=_gen(4))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    fc = FisherCollector(model, "empirical", element_se=True).collect(x, y)
    huge = x.clone()
    huge[2, 1] = 1e80
    g = per_sample_gradients(model, huge, y)["weight"]
    assert bool(g.square().isfinite().all())
    assert not bool(g.pow(4).isfinite().all())
    fc.collect(huge, y)
    assert fc.counts["skipped"] == 1
    assert fc.counts["samples"] == 6
    for name, g in per_sample_gradients(model, x, y).items():
        torch.testing.assert_close(fc.fisher()[name], g.square().mean(0))
        torch.testing.assert_close(fc.standard_error()[name], g.square().std(0) / 6**0.5)
    _assert_group_values(fc, model, labelled_gradients(model, x, y))


# ------------------------------------------------------------------------- token units
class _LM(nn.Module):
    """Position-independent: each position's loss depends on its own token only, so the
    position-wise gradients are the per-token gradients."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7)

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def _lm_batch(seed: int, batch: int = 3, length: int = 5):
    ids = torch.randint(0, 7, (batch, length), generator=_gen(seed))
    labels = ids.clone()
    labels[0, :2] = -100  # a prompt
    labels[-1, -1] = -100
    return ids, labels


def _token_mask(labels):
    mask = torch.zeros(labels.shape, dtype=torch.float64)
    mask[:, :-1] = (labels[:, 1:] != -100).double()
    return mask


def _token_pairs(model, ids, labels):
    """One unit per active target: the gradient of that token's loss (exact for _LM)."""
    params = dict(model.named_parameters())
    logits = model(ids)
    pairs = []
    for i, t in _token_mask(labels).nonzero().tolist():
        loss = nn.functional.cross_entropy(logits[i, t], labels[i, t + 1])
        grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
        pairs.append([(1.0, dict(zip(params, grads, strict=True)))])
    return pairs


def test_token_unit_group_values_and_errors_count_only_active_positions():
    torch.manual_seed(0)
    model = _LM().double()
    ids, labels = _lm_batch(5)
    fc = FisherCollector(model, "empirical", "causal_lm", "token").collect(ids, labels)
    pairs = _token_pairs(model, ids, labels)
    assert fc.counts["units"] == len(pairs) == 10  # 12 targets, 2 masked
    _assert_group_values(fc, model, pairs)
    tensors = fc.state_dict()["tensors"]
    for fam in _per_unit(fc):
        for label in ("trace", "mask"):
            count = tensors[f"{label}/{fam.name}/count"]
            weight_sum = tensors[f"{label}/{fam.name}/weight_sum"]
            ess = weight_sum.square() / tensors[f"{label}/{fam.name}/weight_sq_sum"]
            assert count.item() == ess.item() == len(pairs)
    # two batches, one without any active target: the same as the first batch alone
    empty = torch.full_like(labels, -100)
    fc.collect(ids, empty)
    _assert_group_values(fc, model, pairs)


def test_normalizations_across_units_against_references():
    torch.manual_seed(1)
    model = _LM().double()
    ids, labels = _lm_batch(6)
    n_tokens = int((labels[:, 1:] != -100).sum())
    per_sequence = per_sample_gradients(model, ids, labels, likelihood="causal_lm")
    sample = FisherCollector(model, "empirical", "causal_lm", "sample").collect(ids, labels)
    for name, g in per_sequence.items():
        torch.testing.assert_close(sample.fisher("token")[name], g.square().sum(0) / n_tokens)
        torch.testing.assert_close(sample.fisher("none")[name], g.square().sum(0))
    seq_pairs = labelled_gradients(model, ids, labels, likelihood="causal_lm")
    params = dict(model.named_parameters())
    for fam in _per_unit(sample):
        ref = reference_group_values(seq_pairs, params, fam)
        got = sample.group_fisher("mask", "token")[fam.name]
        torch.testing.assert_close(got, ref["mask_rows"].sum(0) / n_tokens)
    token = FisherCollector(model, "empirical", "causal_lm", "token").collect(ids, labels)
    total = positionwise_fisher(model, ids, causal_lm_objective(labels), _token_mask(labels))
    for name, value in total.items():
        torch.testing.assert_close(token.fisher("sample")[name], value / ids.shape[0])
    pairs = _token_pairs(model, ids, labels)
    for fam in _per_unit(token):
        ref = reference_group_values(pairs, params, fam)
        got = token.group_fisher("mask", "sample")[fam.name]
        torch.testing.assert_close(got, ref["mask_rows"].sum(0) / ids.shape[0])


# -------------------------------------------------------------------------------- EMA
def test_ema_skips_a_batch_without_active_targets():
    torch.manual_seed(2)
    model = _LM().double()
    batches = [_lm_batch(7), _lm_batch(8)]
    fc = FisherCollector(model, "empirical", "causal_lm", "token", mode="ema", beta=0.7)
    means, masks = [], []
    for step, (ids, labels) in enumerate(batches):
        fc.collect(ids, labels)
        pairs = _token_pairs(model, ids, labels)
        params = dict(model.named_parameters())
        means.append({n: sum(p[0][1][n].square() for p in pairs) / len(pairs) for n in fc.names})
        masks.append(
            {f.name: reference_group_values(pairs, params, f)["mask"] for f in _per_unit(fc)}
        )
        fc.collect(ids, torch.full_like(labels, -100))  # no unit: no observation
        for name, value in fc.fisher().items():
            expected = reference_ema([m[name] for m in means], 0.7)["mean"]
            torch.testing.assert_close(value, expected, msg=f"{step} {name}")
        for fam, value in fc.group_fisher("mask").items():
            expected = reference_ema([m[fam] for m in masks], 0.7)["mean"]
            torch.testing.assert_close(value, expected, msg=f"{step} {fam}")


def _ema_fit():
    model = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64, generator=_gen(9))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return FisherCollector(model, "empirical", mode="ema").collect(x, y), model, x, y


@pytest.mark.parametrize("normalization", ["none", "token"])
def test_ema_refuses_normalizations_it_cannot_honour(normalization):
    fc = _ema_fit()[0]
    with pytest.raises(ConfigurationError, match=f"normalization='{normalization}'.*mode='ema'"):
        fc.fisher(normalization)


@pytest.mark.parametrize("normalization", ["none", "token"])
@pytest.mark.parametrize("kind", ["trace", "mask"])
def test_ema_group_reads_refuse_normalizations_it_cannot_honour(normalization, kind):
    fc = _ema_fit()[0]
    with pytest.raises(ConfigurationError, match="normalization="):
        fc.group_fisher(kind, normalization)


@pytest.mark.parametrize("normalization", ["unit", "sample"])
def test_ema_reads_the_normalizations_it_has(normalization):
    fc, model, x, y = _ema_fit()
    expected = reference_fisher(model, x, y)
    for name, value in fc.fisher(normalization).items():
        torch.testing.assert_close(value, expected[name])


# -------------------------------------------------------------------------- pruning
def _budgets(sizes, min_keep):
    total = sum(sizes)
    cap = total - min_keep * len(sizes)
    for budget in [*range(cap + 1), 0.25, 0.4, 0.5]:
        count = round(budget * total) if isinstance(budget, float) else budget
        if count <= cap:
            yield budget


PRUNING_CASES = [
    (sizes, min_keep, budget)
    for sizes in [(4, 4), (4, 2), (5, 3, 2)]
    for min_keep in (1, 2)
    for budget in _budgets(sizes, min_keep)
]


def _pruning_fit(sizes):
    torch.manual_seed(3)
    layers, width = [], 3
    for size in sizes:
        layers += [nn.Linear(width, size), nn.Tanh()]
        width = size
    model = nn.Sequential(*layers[:-1]).double()
    x = torch.randn(10, 3, dtype=torch.float64, generator=_gen(10))
    y = torch.randint(0, sizes[-1], (10,), generator=_gen(11))
    return FisherCollector(model, "empirical").collect(x, y)


@pytest.mark.parametrize(("sizes", "min_keep", "budget"), PRUNING_CASES)
def test_layer_scope_pruning_removes_exactly_the_budget(sizes, min_keep, budget):
    fc = _pruning_fit(sizes)
    values = fc.group_fisher("mask")
    total = sum(sizes)
    count = round(budget * total) if isinstance(budget, float) else budget
    masks = pruning_masks(fc, budget, structure="channels", scope="layer", min_keep=min_keep)
    removed = {name: int((~m).sum()) for name, m in masks.items()}
    assert sum(removed.values()) == count, removed
    free = all(-(-count * s // total) <= s - min_keep for s in sizes)
    for (name, mask), size in zip(masks.items(), sizes, strict=True):
        assert removed[name] <= size - min_keep
        if free:  # no cap binds: within one of the exact share
            assert abs(removed[name] - count * size / total) < 1, removed
        if removed[name]:  # the least important groups of the family go
            assert values[name][~mask].max() <= values[name][mask].min()
