"""Bad input: clear errors naming the argument and the valid values."""

import pytest
import torch

from gradstats import VarianceGradientScaler


def _params():
    return torch.nn.Linear(2, 1).named_parameters()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"statistic": "variance"},
            ValueError,
            "statistic must be one of 'temporal', 'same_point'",
        ),
        ({"alpha": -0.5}, ValueError, r"alpha must lie in \[0.0, inf\]"),
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
    with pytest.raises(error, match=match):
        VarianceGradientScaler(_params(), **kwargs)


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
        VarianceGradientScaler(params)


def test_param_group_aggregation_without_groups_uses_one_group():
    vgs = VarianceGradientScaler(_params(), aggregate="param_group")
    assert vgs.scaling_factors().shape == (1,)


def test_sparse_gradients_are_rejected():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    vgs = VarianceGradientScaler(emb.named_parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        vgs.step()
