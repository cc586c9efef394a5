"""Bad input: clear errors naming the argument and the valid values."""

import pytest
import torch

from gradstats import VarianceGradientScaler
from gradstats.errors import ConfigurationError, ConfigurationTypeError


def _params():
    return torch.nn.Linear(2, 1).named_parameters()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"statistic": "variance"},
            ValueError,
            "statistic must be one of 'auto', 'temporal', 'same_point'",
        ),
        ({"alpha": -0.5}, ValueError, r"alpha must lie in \[0.0, inf\) and finite; got -0.5"),
        ({"beta": 1.0}, ValueError, r"beta must lie in the open interval \(0, 1\)"),
        ({"beta": 0.0}, ValueError, "beta"),
        ({"beta": "0.9"}, TypeError, "beta"),
        ({"apply_to": "loss"}, ValueError, "apply_to must be one of 'grad', 'lr'"),
        ({"aggregate": "layer"}, ValueError, "aggregate must be one of"),
        (
            {"apply_to": "lr", "aggregate": "tensor"},
            ValueError,
            "aggregate must be 'global' or 'param_group'",
        ),
        ({"min_scale": 1.5}, ValueError, "min_scale"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"max_rate": -0.1}, ValueError, "max_rate"),
        ({"log_every": 0}, ValueError, "log_every"),
        ({"enabled": 1}, TypeError, "enabled must be a bool"),
    ],
)
def test_bad_configuration(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        VarianceGradientScaler(_params(), **kwargs)
    assert isinstance(info.value, ConfigurationError)


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": INF}, r"alpha must lie in \[0.0, inf\) and finite; got inf"),
        ({"alpha": -INF}, r"alpha must lie in .*; got -inf"),
        ({"alpha": NAN}, r"alpha must lie in .*; got nan"),
        ({"eps": INF}, r"eps must lie in \[0.0, inf\) and finite; got inf"),
        ({"eps": NAN}, r"eps must lie in"),
        ({"eps": -1e-3}, r"eps must lie in"),
        ({"min_scale": NAN}, r"min_scale must lie in \[0.0, 1.0\]; got nan"),
        ({"min_scale": -0.1}, r"min_scale must lie in \[0.0, 1.0\]"),
        ({"max_rate": INF}, r"max_rate must lie in .*; got inf"),
        ({"max_rate": NAN}, r"max_rate must lie in .*; got nan"),
        ({"confidence": INF}, r"confidence must lie in .*; got inf"),
        ({"confidence": NAN}, r"confidence must lie in .*; got nan"),
        ({"confidence": -0.5}, r"confidence must lie in"),
        ({"beta": NAN}, r"beta must lie in the open interval \(0, 1\); got nan"),
        ({"beta": INF}, r"beta must lie in the open interval"),
        ({"nonfinite": "ignore"}, r"nonfinite must be one of 'skip', 'raise'; got 'ignore'"),
        ({"nonfinite": None}, r"nonfinite must be one of 'skip', 'raise'; got None"),
        ({"max_nonfinite_steps": 0}, r"max_nonfinite_steps must be an int >= 1; got 0"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1"),
    ],
)
def test_non_finite_or_out_of_range_settings_are_rejected(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        VarianceGradientScaler(_params(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": "1"}, "alpha must be a number; got str"),
        ({"alpha": True}, "alpha must be a number; got bool"),
        ({"foreach": "yes"}, "foreach must be a bool"),
        ({"max_nonfinite_steps": 2.0}, "max_nonfinite_steps must be an int"),
        ({"logger": "tensorboard"}, "logger must be callable"),
        ({"optimizer": "sgd"}, "optimizer must be a torch.optim.Optimizer; got str"),
    ],
)
def test_wrongly_typed_settings_are_type_errors(kwargs, match):
    with pytest.raises(ConfigurationTypeError, match=match) as info:
        VarianceGradientScaler(_params(), **kwargs)
    assert isinstance(info.value, TypeError)


def test_infinite_alpha_can_no_longer_reach_the_gradients():
    """alpha=inf used to be accepted and wrote NaN into .grad; it fails at construction now."""
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ConfigurationError, match="alpha"):
        VarianceGradientScaler(
            model.named_parameters(), alpha=float("inf"), statistic="temporal", rule="shrink"
        )


def test_unknown_keyword_is_rejected():
    with pytest.raises(TypeError, match="unexpected keyword argument 'aplha'"):
        VarianceGradientScaler(_params(), aplha=1.0)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        (torch.zeros(3), TypeError, "single tensor"),
        ([], ValueError, "no tensor that requires a gradient"),
        ([torch.zeros(2, requires_grad=True)] * 2, ValueError, "same tensor twice"),
        (
            [("a", torch.zeros(2, requires_grad=True)), ("a", torch.zeros(1, requires_grad=True))],
            ValueError,
            "name 'a' twice",
        ),
        ([3.0], TypeError, "tensors or"),
    ],
)
def test_bad_params(params, error, match):
    with pytest.raises(error, match=match):
        VarianceGradientScaler(params, statistic="temporal", rule="shrink")


def test_param_group_aggregation_without_groups_uses_one_group():
    vgs = VarianceGradientScaler(
        _params(), aggregate="param_group", statistic="temporal", rule="shrink"
    )
    assert vgs.scaling_factors().shape == (1,)


def test_sparse_gradients_are_rejected():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    vgs = VarianceGradientScaler(emb.named_parameters(), statistic="temporal", rule="shrink")
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ConfigurationError, match="sparse gradients"):
        vgs.step()
    assert vgs.updates == 0
