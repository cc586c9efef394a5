"""Bad input to FisherCollector, its reads and its loader: always a gradstats error class
(ConfigurationError, or ConfigurationTypeError for a wrong type) whose message names the argument
and the valid values — never a raw traceback from torch or Python."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.fisher import FisherCollector
from tests.fisher.models import mlp

X = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randint(0, 4, (6,), generator=torch.Generator().manual_seed(1))
MODEL = mlp((3, 5, 4)).double()


def _per_sample_loss(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


# (keyword arguments, error class, message) — the message names the argument
CONSTRUCTOR = {
    "model not a module": ({"model": "mlp"}, ConfigurationTypeError, "model must be a torch.nn"),
    "bogus kind": ({"kind": "fisher"}, ConfigurationError, "kind must be one of 'empirical'"),
    "bogus likelihood": (
        {"likelihood": "poisson"},
        ConfigurationError,
        "likelihood must be one of 'classification', 'regression', 'causal_lm'",
    ),
    "bogus unit": ({"unit": "word"}, ConfigurationError, "unit must be one of 'sample', 'token'"),
    "token unit without tokens": (
        {"unit": "token"},
        ConfigurationError,
        "unit='token' needs a likelihood with token positions",
    ),
    "zero mc samples": (
        {"kind": "mc", "mc_samples": 0},
        ConfigurationError,
        "mc_samples must be an int >= 1",
    ),
    "float mc samples": (
        {"kind": "mc", "mc_samples": 2.0},
        ConfigurationTypeError,
        "mc_samples must be an int",
    ),
    "mc samples without mc": ({"mc_samples": 3}, ConfigurationError, "applies to kind='mc' only"),
    "generator not a generator": (
        {"generator": 3},
        ConfigurationTypeError,
        "generator must be a torch.Generator",
    ),
    "float seed": ({"seed": 1.5}, ConfigurationTypeError, "seed must be an int"),
    "bool seed": ({"seed": True}, ConfigurationTypeError, "seed must be an int"),
    "params a string": ({"params": "0.weight"}, ConfigurationTypeError, "params must be an"),
    "params an int": ({"params": 3}, ConfigurationTypeError, "params must be an iterable"),
    "unknown param": (
        {"params": ["nope"]},
        ConfigurationError,
        r"params: unknown parameter 'nope' \(the model has: 0.weight",
    ),
    "no params": ({"params": []}, ConfigurationError, "no parameter that requires grad"),
    "bogus groups": ({"groups": "heads"}, ConfigurationError, "groups must be 'auto', None"),
    "groups of strings": (
        {"groups": ["heads"]},
        ConfigurationTypeError,
        "groups must hold GroupFamily objects; got a str",
    ),
    "bogus mode": ({"mode": "running"}, ConfigurationError, "mode must be one of 'cumulative'"),
    "beta zero": ({"beta": 0.0}, ConfigurationError, r"beta must lie in the open interval"),
    "beta one": ({"beta": 1.0}, ConfigurationError, r"beta must lie in the open interval"),
    "beta nan": ({"beta": float("nan")}, ConfigurationError, r"beta must lie in the open"),
    "beta a string": ({"beta": "0.9"}, ConfigurationTypeError, r"beta must be a float"),
    "signal a string": ({"signal": "yes"}, ConfigurationTypeError, "signal must be True or False"),
    "element_se a number": ({"element_se": 1}, ConfigurationTypeError, "element_se must be True"),
    "element_se with exact": (
        {"kind": "exact", "element_se": True},
        ConfigurationError,
        "element_se=True needs kind='empirical'",
    ),
    "batch_grad_sq in ema": (
        {"kind": "batch_grad_sq", "mode": "ema"},
        ConfigurationError,
        "supports mode='cumulative' only",
    ),
    "loss_reduction for a named likelihood": (
        {"loss_reduction": "mean"},
        ConfigurationError,
        "loss_reduction applies to callable likelihoods only",
    ),
    "bogus loss_reduction": (
        {"likelihood": _per_sample_loss, "loss_reduction": "avg"},
        ConfigurationError,
        "loss_reduction must be one of 'sum', 'mean'",
    ),
    "mc with a callable": (
        {"likelihood": _per_sample_loss, "kind": "mc"},
        ConfigurationError,
        "kind='mc' is not available for likelihood",
    ),
    "zero chunk_bytes": ({"chunk_bytes": 0}, ConfigurationError, "chunk_bytes must be an int >= 1"),
    "negative max_exact_passes": (
        {"max_exact_passes": -1},
        ConfigurationError,
        "max_exact_passes must be an int >= 1",
    ),
    "check_first_batch a string": (
        {"check_first_batch": "no"},
        ConfigurationTypeError,
        "check_first_batch must be True or False",
    ),
    "bogus nonfinite": (
        {"nonfinite": "ignore"},
        ConfigurationError,
        "nonfinite must be one of 'skip', 'raise'",
    ),
}


@pytest.mark.parametrize("case", list(CONSTRUCTOR))
def test_bad_constructor_arguments(case):
    kwargs, error, match = CONSTRUCTOR[case]
    kwargs = {"model": MODEL} | kwargs
    model = kwargs.pop("model")
    with pytest.raises(error, match=match):
        FisherCollector(model, **kwargs)


def test_a_bad_argument_leaves_no_hooks_on_the_model():
    model = mlp((3, 5, 4)).double()
    with pytest.raises(ConfigurationError):
        FisherCollector(model, nonfinite="never")
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


FITTED = FisherCollector(MODEL).collect(X, Y)
EMA = FisherCollector(MODEL, mode="ema").collect(X, Y)

READS = {
    "bogus normalization": (
        lambda: FITTED.fisher("batch"),
        ConfigurationError,
        "normalization must be one of 'unit', 'sample', 'token', 'none'",
    ),
    "dtype a string": (
        lambda: FITTED.fisher(dtype="float32"),
        ConfigurationError,
        "dtype must be a floating torch.dtype",
    ),
    "integer dtype": (
        lambda: FITTED.mean_gradient(dtype=torch.int64),
        ConfigurationError,
        "dtype must be a floating torch.dtype",
    ),
    "ema sum": (lambda: EMA.fisher("none"), ConfigurationError, "not available in mode='ema'"),
    "bogus group kind": (
        lambda: FITTED.group_fisher("sum"),
        ConfigurationError,
        "kind must be one of 'trace', 'mask'",
    ),
    "ema group standard errors": (
        lambda: EMA.group_standard_error(),
        ConfigurationError,
        "group standard errors need mode='cumulative'",
    ),
    "unknown family": (
        lambda: FITTED.relative_standard_error(families=["nope"]),
        ConfigurationError,
        "families: unknown or without per-unit values",
    ),
    "loader not iterable": (
        lambda: FisherCollector(MODEL).collect_loader(3, progress=False),
        ConfigurationTypeError,
        "loader must be an iterable of batches; got int",
    ),
    "loader device": (
        lambda: FisherCollector(MODEL).collect_loader([], device="gpu0", progress=False),
        ConfigurationError,
        "device must be a torch.device or a device string",
    ),
    "loader targets": (
        lambda: FisherCollector(MODEL).collect_loader([{"x": X, "labels": 3}], progress=False),
        ConfigurationTypeError,
        "targets must be a tensor or None; got int",
    ),
    "inputs of a bad type": (
        lambda: FisherCollector(MODEL).collect(3, Y),
        ConfigurationTypeError,
        "inputs must be a tensor, a mapping",
    ),
    "float class targets": (
        lambda: FisherCollector(MODEL).collect(X, Y.double()),
        ConfigurationTypeError,
        "targets must be an integer tensor",
    ),
    "class out of range": (
        lambda: FisherCollector(MODEL).collect(X, Y + 10),
        ConfigurationError,
        r"must lie in \[0, 4\)",
    ),
    "empirical without targets": (
        lambda: FisherCollector(MODEL).collect(X),
        ConfigurationError,
        "kind='empirical' needs targets",
    ),
    "load device": (
        lambda: FisherCollector.load("x.safetensors", device="gpu0"),
        ConfigurationError,
        "device must be a torch.device",
    ),
    "load model": (
        lambda: FisherCollector.load("x.safetensors", model="mlp"),
        ConfigurationTypeError,
        "model must be a torch.nn.Module or None",
    ),
    "load path": (
        lambda: FisherCollector.load(3),
        ConfigurationTypeError,
        "path must be a str or Path",
    ),
}


@pytest.mark.parametrize("case", list(READS))
def test_bad_arguments_to_reads_and_collect(case):
    call, error, match = READS[case]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("kind", ["mc", "exact"])
def test_nan_logits_are_skipped_not_a_sampling_crash(kind):
    bad = X.clone()
    bad[0, 0] = float("nan")
    fc = FisherCollector(MODEL, kind, groups=None).collect(X).collect(bad)
    assert fc.counts["skipped"] == 1
    assert fc.counts["samples"] == 6


def test_causal_lm_mc_with_nan_logits_is_skipped():
    class NanLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5)

        def forward(self, input_ids):
            return self.head(self.embed(input_ids)) * float("nan")

    fc = FisherCollector(NanLM(), "mc", "causal_lm", groups=None)
    fc.collect(torch.tensor([[0, 1, 2], [3, 4, 0]]))
    assert fc.counts["skipped"] == 1
