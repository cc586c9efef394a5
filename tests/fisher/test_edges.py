"""Edges a user hits (issue 10 item 3): zero-size parameters and layers, replaced submodules."""

from __future__ import annotations

import collections.abc
import warnings

import pytest
import torch
from torch import nn

from gradstats.errors import StateError
from gradstats.fisher import FisherCollector
from gradstats.testing import per_sample_gradients, reference_fisher

X = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _quiet(build):
    with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op"
        warnings.simplefilter("ignore", UserWarning)
        return build().double()


class ZeroParam(nn.Module):
    """A module with an extra zero-size parameter that its forward reads (as a no-op)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.empty = nn.Linear(4, 0)

    def forward(self, x):
        return self.lin(x) + self.empty(x).sum(-1, keepdim=True)


MODELS = {
    "Linear(4, 0) alone": lambda: nn.Sequential(nn.Linear(4, 0)),
    "Linear(3, 0) last": lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 0)),
    "zero-size branch": ZeroParam,
}
OPTIONS = {
    "defaults": {},
    "element_se": {"element_se": True},
    "no groups": {"groups": None},
    "mc": {"kind": "mc"},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS.keys())
def test_zero_size_parameters_give_zero_size_fisher_tensors(build, options):
    model = _quiet(build)
    y = torch.randn(model(X).shape, dtype=torch.float64)
    kind = options.get("kind", "empirical")
    rest = {k: v for k, v in options.items() if k != "kind"}
    fc = FisherCollector(model, kind, "regression", **rest).collect(X, y)
    fisher = fc.fisher()
    for name, p in model.named_parameters():
        assert fisher[name].shape == p.shape
    if kind == "empirical":
        expected = reference_fisher(model, X, y, likelihood="regression")
        for name, value in expected.items():
            torch.testing.assert_close(fisher[name], value)
    if options.get("element_se"):
        for name, p in model.named_parameters():
            assert fc.standard_error()[name].shape == p.shape


def test_zero_width_layer_group_reads_are_empty():
    model = _quiet(lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 0)))
    fc = FisherCollector(model, "empirical", "regression").collect(X, torch.zeros(5, 0))
    sizes = {fam: value.numel() for fam, value in fc.group_fisher("trace").items()}
    assert 0 in sizes.values()
    assert all(v.numel() == 0 or bool(v.isfinite().all()) for v in fc.group_fisher().values())


def test_zero_width_embedding():
    model = _quiet(lambda: nn.Sequential(nn.Embedding(5, 0), nn.Flatten(), nn.Linear(0, 2)))
    ids = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(1))
    fc = FisherCollector(model, "empirical", "regression", element_se=True)
    fc.collect(ids, torch.randn(4, 2, dtype=torch.float64))
    assert fc.fisher()["0.weight"].shape == (5, 0)
    assert fc.standard_error()["2.bias"].shape == (2,)


# ------------------------------------------------------------------ replaced submodules
def _mlp():
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def _replace_module(model):
    model[2] = nn.Linear(3, 2).double()


def _replace_parameter(model):
    model[0].weight = nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))


def _delete_module(model):
    del model[2]
    model.append(nn.Identity())


REPLACEMENTS = {
    "module": (_replace_module, r"module '2' was replaced"),
    "parameter": (_replace_parameter, r"parameter '0\.weight' \(module '0'\) was replaced"),
    "removed": (_delete_module, r"module '2' was replaced or removed"),
}


@pytest.mark.parametrize(("change", "match"), REPLACEMENTS.values(), ids=REPLACEMENTS.keys())
def test_a_replaced_submodule_is_detected_at_collect(change, match):
    model = _mlp()
    y = torch.randn(5, 2, dtype=torch.float64)
    fc = FisherCollector(model, "empirical", "regression", element_se=True).collect(X, y)
    before = fc.state_dict()
    change(model)
    with pytest.raises(StateError, match=match):
        fc.collect(X, y)
    _assert_equal(fc.state_dict(), before)


def _assert_equal(actual, expected):
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key, value in expected.items():
            _assert_equal(actual[key], value)
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    else:
        assert actual == expected


def test_a_replaced_ancestor_container_is_detected():
    """The hooked Linear itself is unchanged, but the container holding it was swapped for a
    copy: the model no longer calls the hooked module (every link of the path is checked)."""
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 3), nn.Tanh()), nn.Linear(3, 2)).double()
    y = torch.randn(5, 2, dtype=torch.float64)
    fc = FisherCollector(model, "empirical", "regression").collect(X, y)
    model[0] = nn.Sequential(*model[0])  # a new container around the *same* children
    fc.collect(X, y)  # same modules on the path's ends, same hooks: still right
    model[0] = nn.Sequential(nn.Linear(4, 3).double(), nn.Tanh())
    with pytest.raises(StateError, match=r"module '0\.0' was replaced"):
        fc.collect(X, y)


class _Table(collections.abc.MutableMapping):
    """A children mapping that is not a dict (the quick check must not call dict.get on it)."""

    def __init__(self, items):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __setitem__(self, key, value):
        self._items[key] = value

    def __delitem__(self, key):
        del self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)


@pytest.mark.parametrize("table", [dict, _Table], ids=["new dict", "not a dict"])
def test_a_new_children_mapping_with_the_same_children_is_no_change(table):
    """The quick check compares the containers' dicts themselves; a module whose ``_modules``
    was rebuilt around the same children (a new dict, or a mapping that is not a dict) takes
    the full walk, finds no replacement, and a replacement inside it is still found."""
    model = _mlp()
    y = torch.randn(5, 2, dtype=torch.float64)
    fc = FisherCollector(model, "empirical", "regression").collect(X, y)
    model._modules = table(model._modules)
    fc.collect(X, y)
    fc.collect(X, y)
    assert fc.counts["samples"] == 15
    model._modules["2"] = nn.Linear(3, 2).double()
    with pytest.raises(StateError, match=r"module '2' was replaced"):
        fc.collect(X, y)


def test_large_finite_statistics_are_not_taken_for_overflow():
    """Batch acceptance sums every statistic's total in float64: float32 totals that are each
    finite (near 3e38 together) must not add up to a false inf."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].weight.fill_(1.0)
    x = torch.full((1, 1), 1.2e19)  # (y − t)² / 2 with y ≈ 1.2e19: g = 1.2e19 · 1.2e19 …
    fc = FisherCollector(model, "empirical", "regression", signal=False, groups=None)
    fc.collect(x * 1e-10, torch.zeros(1, 1))  # g² ≈ (1.4e18)² ≈ 2e36 per layer: finite
    assert fc.counts["skipped"] == 0
    assert torch.isfinite(fc.fisher()["0.weight"]).all()


def test_an_unchanged_model_keeps_collecting():
    model = _mlp()
    y = torch.randn(5, 2, dtype=torch.float64)
    fc = FisherCollector(model, "empirical", "regression").collect(X, y)
    model[2].weight.data.mul_(2.0)  # in-place updates (training) are not replacements
    fc.collect(X, y)
    assert fc.counts["samples"] == 10


@pytest.mark.parametrize("other", [{"n_embd": 12, "n_head": 2}, {"n_layer": 1}])
def test_load_on_another_gpt2_says_different_model(tmp_path, other):
    from tests.fisher.models import hf_causal_lm

    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    fc = FisherCollector(hf_causal_lm("gpt2"), "empirical", "causal_lm").collect(ids)
    path = fc.save(tmp_path / "f.safetensors")
    model = hf_causal_lm("gpt2", **other)
    with pytest.raises(StateError, match="was collected on a different model"):
        FisherCollector.load(path, model=model)


class _ScaleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, g * x


class _Scaled(nn.Module):
    """A module whose output comes from a Python ``autograd.Function`` (its node needs the
    ownership token that ``get_gradient_edge`` makes)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return _ScaleFunction.apply(x, self.w)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_python_function_module_gets_per_sample_fisher():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Scaled(), nn.Linear(4, 2))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=gen), torch.randint(0, 2, (6,), generator=gen)
    fc = FisherCollector(model, "empirical")
    fc.collect(x[:2], y[:2]).collect(x[2:], y[2:])
    expected = {n: g.square().mean(0) for n, g in per_sample_gradients(model, x, y).items()}
    for name, value in fc.fisher().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-12)
