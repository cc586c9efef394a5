"""Every warning of the scaler names the user's line, not a line inside gradstats."""

import pytest
import torch

from gradstats import VarianceGradientScaler

from ._helpers import params_like


def _legacy_diagnostic():
    VarianceGradientScaler(params_like(2), statistic="mixed", rule="shrink")


def _adaptive_optimizer():
    named = params_like(2)
    VarianceGradientScaler(
        named,
        optimizer=torch.optim.Adam([p for _, p in named]),
        statistic="temporal",
        rule="shrink",
    )


def _partial_load():
    state = VarianceGradientScaler(params_like(2), statistic="temporal", rule="shrink").state_dict()
    VarianceGradientScaler(params_like(3), statistic="temporal", rule="shrink").load_state_dict(
        state, strict=False
    )


def _other_beta():
    state = VarianceGradientScaler(
        params_like(2), beta=0.5, statistic="temporal", rule="shrink"
    ).state_dict()
    VarianceGradientScaler(
        params_like(2), beta=0.9, statistic="temporal", rule="shrink"
    ).load_state_dict(state)


def _skipped_steps():
    named = params_like(2)
    vgs = VarianceGradientScaler(named, max_nonfinite_steps=3, statistic="temporal", rule="shrink")
    for k in range(6):  # the counters are read at updates 3 and 6
        named[0][1].grad = torch.full((2,), float("nan") if k == 3 else 1.0, dtype=torch.float64)
        vgs.step()


def _one_backward_per_step():
    model = torch.nn.Linear(2, 1)
    vgs = VarianceGradientScaler(model.named_parameters(), statistic="same_point", rule="shrink")
    for _ in range(20):
        model(torch.ones(1, 2)).sum().backward()
        vgs.step()


def _deprecated_field():
    named = params_like(2)
    vgs = VarianceGradientScaler(named, statistic="temporal", rule="shrink")
    named[0][1].grad = torch.ones(2, dtype=torch.float64)
    vgs.step()
    _ = vgs.statistics()["global"].skipped_steps


@pytest.mark.parametrize(
    ("call", "category", "match"),
    [
        (_legacy_diagnostic, UserWarning, "legacy diagnostic"),
        (_adaptive_optimizer, UserWarning, "adaptive optimizer"),
        (_partial_load, UserWarning, "partially loaded"),
        (_other_beta, UserWarning, "continuing EMA statistics saved with beta=0.5"),
        (_skipped_steps, UserWarning, "1 steps with non-finite gradients were skipped"),
        (_deprecated_field, FutureWarning, "skipped_steps is deprecated"),
        (_one_backward_per_step, RuntimeWarning, "several micro-batches of one step"),
    ],
)
def test_warning_points_at_the_callers_line(call, category, match):
    with pytest.warns(category, match=match) as record:
        call()
    assert [w.filename for w in record if issubclass(w.category, category)] == [__file__]
