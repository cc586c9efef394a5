"""The importer of the original scaler's checkpoints converts what the math allows."""

import warnings

import pytest
import torch

from gradstats import VarianceGradientScaler
from gradstats.errors import StateError
from gradstats.scaling import import_legacy_state_dict
from gradstats.testing import reference_scaler_statistics


def _named():
    return [("w", torch.nn.Parameter(torch.zeros(4))), ("b", torch.nn.Parameter(torch.zeros(2)))]


def _history():
    g = torch.Generator().manual_seed(0)
    return [[torch.randn(4, generator=g) + k * 0.2, torch.randn(2, generator=g)] for k in range(7)]


def _original(version, beta=0.9):
    """What the original saved: zero-initialised EMAs of μ and μ² (3.0) or mean(g²) (3.1)."""
    history = _history()
    mean_ema, sq_ema = [0.0, 0.0], [0.0, 0.0]
    for grads in history:
        for i, g in enumerate(grads):
            mu = g.mean().item()
            second = mu * mu if version == "3.0" else g.square().mean().item()
            mean_ema[i] = beta * mean_ema[i] + (1 - beta) * mu
            sq_ema[i] = beta * sq_ema[i] + (1 - beta) * second
    return {
        "vgs_version": version, "step_count": len(history), "beta": beta, "alpha": 0.5,
        "eps": 1e-8, "warmup_steps": 3, "enabled": True,
        "param_grad_mean_ema": mean_ema, "param_grad_sq_ema": sq_ema,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("version", "statistic"), [("3.0", "tensor_mean"), ("3.1", "mixed"), ("3.2", "mixed")]
)
def test_convertible_versions_continue_their_statistic(version, statistic):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaler, report = import_legacy_state_dict(_original(version), _named(), statistic=statistic)
    assert report.converted == ("w", "b")
    assert scaler.config.alpha == 0.5
    assert scaler.config.warmup_steps == 3
    assert "eps" in report.dropped
    scaler.refresh()
    stats = scaler.statistics()
    ref = reference_scaler_statistics([g[0] for g in _history()], 0.9)
    assert stats["w"].variance == pytest.approx(ref[statistic], rel=1e-9)


def test_temporal_starts_fresh_and_says_why():
    scaler, report = import_legacy_state_dict(_original("3.1"), _named())
    assert report.converted == ()
    assert "cannot seed statistic='temporal'" in report.dropped["param_grad_mean_ema"]
    assert scaler.statistics()["w"].count == 0
    assert "dropped param_grad_sq_ema" in str(report)


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_spatial_versions_keep_only_settings(version):
    legacy = {"vgs_version": version, "step_count": 10, "beta": 0.95, "alpha": 0.2,
              "grad_mean_ema": 0.3, "grad_var_ema": 0.1}  # fmt: skip
    scaler, report = import_legacy_state_dict(legacy, _named())
    assert scaler.config.beta == 0.95
    assert set(report.dropped) == {"grad_mean_ema", "grad_var_ema"}


@pytest.mark.parametrize(
    ("legacy", "match"),
    [
        ({"vgs_version": "4.0"}, "vgs_version must be one of"),
        ({"step_count": 3}, "'vgs_version'"),
        ([1, 2], "'vgs_version'"),
    ],
)
def test_bad_legacy_input(legacy, match):
    with pytest.raises(StateError, match=match):
        import_legacy_state_dict(legacy, _named())


def test_legacy_lists_must_match_the_params():
    with (
        pytest.warns(UserWarning, match="legacy diagnostic"),
        pytest.raises(ValueError, match="statistics for 2 parameters but params has 1"),
    ):
        import_legacy_state_dict(_original("3.0"), _named()[:1], statistic="tensor_mean")


def test_load_state_dict_points_to_the_importer():
    with pytest.raises(ValueError, match="import_legacy_state_dict"):
        VarianceGradientScaler(_named(), statistic="temporal", rule="shrink").load_state_dict(
            _original("3.1")
        )
