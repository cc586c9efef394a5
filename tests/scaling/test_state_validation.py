"""Nothing half-updated, nothing tampered accepted: every bad checkpoint is a StateError naming
the key, raised before anything is loaded; a step that cannot fit the state changes nothing."""

import copy
import warnings

import pytest
import torch

from gradstats import VarianceGradientScaler
from gradstats.errors import StateError

from ._helpers import assert_same, feed, make, params_like, snapshot

SHAPES = (3, (2, 2))


def _trained(statistic="temporal", foreach=True, steps=4):
    named = params_like(*SHAPES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy diagnostics warn on construction
        vgs = make(named, beta=0.8, statistic=statistic, foreach=foreach, rule="shrink")
    g = torch.Generator().manual_seed(0)
    history = [[torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]]
    for _ in range(steps - 1):
        history.append([h + 0.3 * torch.randn(h.shape, generator=g, dtype=torch.float64)
                        for h in history[-1]])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feed(vgs, named, history)
        if statistic == "temporal":  # one skipped step, so that every counter is non-zero
            feed(vgs, named, [[torch.full(SHAPES[:1], float("nan")), None]])
    return named, vgs


def _set(path, value):
    def corrupt(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return corrupt


def _drop(path):
    def corrupt(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return corrupt


T = ("tensors", "p0")
CASES = {
    "no counters": (_drop(("counters",)), r"misses the key 'counters'"),
    "no factor": (_drop(("factor",)), r"misses the key 'factor'"),
    "no updates": (_drop(("updates",)), r"misses the key 'updates'"),
    "no tensors": (_drop(("tensors",)), r"misses the key 'tensors'"),
    "no config": (_drop(("config",)), r"misses the key 'config'"),
    "config without statistic": (_drop(("config", "statistic")), r"\['config'\] misses the key"),
    "config a list": (_set(("config",), []), r"\['config'\] must be a dict"),
    "no skipped counter": (_drop(("counters", "skipped")), r"\['counters'\] misses the key 'skip"),
    "integer counters": (
        _set(("counters",), {"nonfinite": 1, "consecutive": 1, "skipped": 1}),
        r"\['counters'\]\['nonfinite'\] must be a 0-dim integer tensor; got int",
    ),
    "float counter": (
        _set(("counters", "skipped"), torch.tensor(1.0)),
        r"\['skipped'\] must be a 0-dim integer tensor",
    ),
    "negative counter": (
        _set(("counters", "nonfinite"), torch.tensor(-1)),
        r"\['nonfinite'\] must be >= 0",
    ),
    "impossible counters": (
        _set(("counters", "consecutive"), torch.tensor(4)),
        r"counters'\] is impossible: it needs consecutive <= nonfinite",
    ),
    "more skipped than updates": (
        _set(("counters", "skipped"), torch.tensor(99)),
        r"counters'\] is impossible",
    ),
    "negative updates": (_set(("updates",), -1), r"\['updates'\] must be >= 0"),
    "float updates": (_set(("updates",), 5.0), r"\['updates'\] must be an int; got float"),
    "factor of wrong rank": (_set(("factor",), torch.tensor(0.5)), r"1-dim floating tensor"),
    "NaN factor": (_set(("factor",), torch.tensor([float("nan")])), r"finite factors >= 0"),
    "negative factor": (_set(("factor",), torch.tensor([-0.5])), r"finite factors >= 0"),
    "progress NaN": (_set(("progress",), torch.tensor(float("nan"))), r"progress.*finite"),
    "progress of wrong rank": (_set(("progress",), torch.zeros(2)), r"progress.*0-dim"),
    "tensors a list": (_set(("tensors",), []), r"\['tensors'\] must be a dict"),
    "entry a tensor": (_set(T, torch.zeros(3)), r"\['p0'\] must be a dict"),
    "entry without shape": (_drop((*T, "shape")), r"\['p0'\] misses the key 'shape'"),
    "entry shape not ints": (_set((*T, "shape"), ["3"]), r"\['shape'\] must be a list of ints"),
    "entry without count": (_drop((*T, "count")), r"\['p0'\] misses the key 'count'"),
    "negative EMA count": (_set((*T, "count"), torch.tensor(-2)), r"\['count'\] must be >= 0"),
    "count of shape [3]": (
        _set((*T, "count"), torch.tensor([1, 2, 3])),
        r"\['count'\] must be a 0-dim integer tensor; got a tensor of shape \(3,\)",
    ),
    "float count": (_set((*T, "count"), torch.tensor(4.0)), r"\['count'\] must be a 0-dim int"),
    "wrongly shaped mean": (
        _set((*T, "mean"), torch.zeros(4, dtype=torch.float64)),
        r"\['mean'\] must have shape \(3,\) \(the entry's shape \[3\]\); got \(4,\)",
    ),
    "integer mean": (_set((*T, "mean"), torch.zeros(3, dtype=torch.int64)), r"floating tensor"),
    "NaN mean": (_set((*T, "mean"), torch.full((3,), float("nan"))), r"\['mean'\] holds NaN"),
    "NaN sq_ema": (_set((*T, "sq_ema"), torch.tensor(float("nan"))), r"\['sq_ema'\] holds NaN"),
    "inf sq_ema": (_set((*T, "sq_ema"), torch.tensor(float("inf"))), r"\['sq_ema'\] holds NaN"),
    "negative sq_ema": (_set((*T, "sq_ema"), torch.tensor(-1.0)), r"\['sq_ema'\] is negative"),
    "sq_ema of shape [3]": (_set((*T, "sq_ema"), torch.zeros(3)), r"\['sq_ema'\] must have shape"),
    "NaN var_sum": (_set((*T, "var_sum"), torch.tensor(float("nan"))), r"\['var_sum'\] holds NaN"),
    "negative var_sum": (_set((*T, "var_sum"), torch.tensor(-1.0)), r"\['var_sum'\] is negative"),
    "var_sum of shape [3]": (
        _set((*T, "var_sum"), torch.zeros(3)),
        r"\['var_sum'\] must have shape",
    ),
    "inf mean_sq": (_set((*T, "mean_sq"), torch.tensor(float("inf"))), r"\['mean_sq'\] holds NaN"),
    "negative mean_sq": (_set((*T, "mean_sq"), torch.tensor(-1.0)), r"\['mean_sq'\] is negative"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_checkpoint_is_rejected_and_nothing_is_loaded(case):
    corrupt, match = CASES[case]
    _, source = _trained(steps=6)
    state = copy.deepcopy(source.state_dict())
    corrupt(state)
    _, target = _trained(steps=3)
    before = snapshot(target)
    with pytest.raises(StateError, match=match):
        target.load_state_dict(state)
    assert_same(before, snapshot(target))


OTHER_STATISTICS = {
    "negative variance (reference)": (
        "temporal",
        False,
        ("var",),
        -torch.ones(3, dtype=torch.float64),
        r"\['var'\] is negative",
    ),
    "NaN same-point noise": (
        "same_point",
        True,
        ("noise_ema",),
        torch.tensor(float("nan")),
        r"\['noise_ema'\] holds",
    ),
    "negative tensor-mean variance": (
        "tensor_mean",
        True,
        ("mu_var",),
        torch.tensor(-0.5),
        r"\['mu_var'\] is negative",
    ),
    "negative spatial spread": (
        "spatial",
        True,
        ("spatial",),
        torch.tensor(-0.5),
        r"\['spatial'\] is negative",
    ),
}


@pytest.mark.parametrize("case", list(OTHER_STATISTICS))
def test_impossible_statistic_values_are_rejected(case):
    statistic, foreach, key, value, match = OTHER_STATISTICS[case]
    _, source = _trained(statistic, foreach, steps=5)
    state = copy.deepcopy(source.state_dict())
    _set((*T, *key), value)(state)
    _, target = _trained(statistic, foreach, steps=2)
    before = snapshot(target)
    with pytest.raises(StateError, match=match):
        target.load_state_dict(state)
    assert_same(before, snapshot(target))


def test_invalid_checkpoint_config_is_rejected_when_adopted():
    _, source = _trained(steps=5)
    state = copy.deepcopy(source.state_dict())
    state["config"]["alpha"] = float("inf")
    _, target = _trained(steps=2)
    before = snapshot(target)
    with pytest.raises(StateError, match=r"\['config'\] is not a valid configuration: alpha"):
        target.load_state_dict(state, use_checkpoint_config=True)
    assert_same(before, snapshot(target))


def test_state_error_is_a_value_error():
    _, target = _trained(steps=2)
    state = target.state_dict()
    del state["tensors"]
    with pytest.raises(ValueError, match="misses the key 'tensors'"):
        target.load_state_dict(state)


def test_a_valid_checkpoint_still_loads_bitwise():
    _, source = _trained(steps=6)
    _, target = _trained(steps=2)
    target.load_state_dict(source.state_dict())
    assert_same(source.state_dict(), target.state_dict())


def test_adopted_beta_reaches_the_statistics():
    """use_checkpoint_config=True with another beta continues exactly like a scaler built with
    the checkpoint's beta."""
    _, source = _trained(steps=4)
    state = source.state_dict()
    named_a = params_like(*SHAPES)
    adopted = make(named_a, beta=0.5, statistic="temporal", rule="shrink")
    adopted.load_state_dict(state, use_checkpoint_config=True)
    named_b = params_like(*SHAPES)
    native = make(named_b, beta=0.8, statistic="temporal", rule="shrink")
    native.load_state_dict(state)
    step = [[torch.ones(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)]]
    feed(adopted, named_a, step)
    feed(native, named_b, step)
    assert adopted.config.beta == 0.8
    assert_same(adopted.state_dict(), native.state_dict())


@pytest.mark.parametrize("statistic", ["temporal", "same_point", "tensor_mean"])
def test_step_after_a_shape_change_raises_and_changes_nothing(statistic):
    named, vgs = _trained(statistic, steps=3)
    before = snapshot(vgs)
    assert before[1]["p0"] == (0 if statistic == "same_point" else 3)  # the count 3 stays 3
    param = named[0][1]
    param.data = torch.zeros(4, dtype=torch.float64)
    param.grad = torch.ones(4, dtype=torch.float64)
    with pytest.raises(StateError, match=r"'p0' now has shape \(4,\).*for shape \(3,\); call reb"):
        vgs.step()
    param.data = torch.zeros(3, dtype=torch.float64)  # statistics() reads the layout's shapes
    param.grad = None
    assert_same(before, snapshot(vgs))


def test_rebind_after_a_shape_change_keeps_the_other_statistics():
    named, vgs = _trained(steps=3)
    kept = vgs.state_dict()["tensors"]["p1"]
    named[0][1].data = torch.zeros(4, dtype=torch.float64)
    report = vgs.rebind(named)
    assert report.mismatched == ("p0",)
    assert_same(kept, vgs.state_dict()["tensors"]["p1"])
    named[0][1].grad = torch.ones(4, dtype=torch.float64)
    named[1][1].grad = torch.ones(2, 2, dtype=torch.float64)
    vgs.step()
    assert vgs.statistics()["p0"].count == 1


def test_legacy_checkpoint_is_a_state_error():
    vgs = VarianceGradientScaler(params_like(2), statistic="temporal", rule="shrink")
    with pytest.raises(StateError, match="import_legacy_state_dict"):
        vgs.load_state_dict({"vgs_version": "3.1", "param_grad_mean_ema": [0.0]})
