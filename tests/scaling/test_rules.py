"""Rules (``rule=``): AdaScale's gain and progress clock, the shrink rule, the registry, the
critical-batch read-out, and their bad input."""

import math
from typing import ClassVar

import pytest
import torch

from gradstats import VarianceGradientScaler
from gradstats.errors import ConfigurationError, ConfigurationTypeError, StateError
from gradstats.scaling import (
    AdaScaleRule,
    ScalerConfig,
    ShrinkRule,
    register_rule,
    registered_rules,
)

from ._helpers import assert_same, feed, make, params_like


def _fairscale_gain(var_base: float, sqr: float, scale: float) -> float:
    """FairScale ``AdaScale.gain``: (var + sqr) / (var / scale + sqr), var the base batch's."""
    return (var_base + sqr) / (var_base / scale + sqr)


def test_adascale_gain_golden_numbers():
    """Spec §3 golden case: tr Σ = 64, ‖G‖² = 1 (B_noise = 64). The lr was tuned at batch 8 and
    the batch is 64 (S = 8): ρ = B_noise / 64 = 1, r = (1 + 8)/(1 + 1) = 4.5 — FairScale's
    (var + sqr)/(var/S + sqr) with var = tr Σ / 8 = 8, sqr = 1 gives the same."""
    rule = AdaScaleRule(8.0)
    gain = rule.factor(torch.tensor([1.0], dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    assert gain.item() == 4.5
    assert _fairscale_gain(8.0, 1.0, 8.0) == 4.5


@pytest.mark.parametrize("seed", range(5))
def test_adascale_gain_equals_the_papers_formula(seed):
    g = torch.Generator().manual_seed(seed)
    trace, sqr = (torch.rand(2, generator=g, dtype=torch.float64) * 10 + 0.01).tolist()
    base, scale = 1 + int(torch.randint(1, 64, (1,), generator=g)), 1 + 15 * torch.rand(1).item()
    rho = trace / (scale * base) / sqr  # the applied batch is scale × base samples
    got = AdaScaleRule(scale).factor(torch.tensor([rho], dtype=torch.float64), torch.ones(1))
    assert got.item() == pytest.approx(_fairscale_gain(trace / base, sqr, scale), rel=1e-13)


def test_adascale_limits():
    rule = AdaScaleRule(8.0)
    rho = torch.tensor([0.0, math.inf, 1e12], dtype=torch.float64)
    got = rule.factor(rho, torch.ones(3, dtype=torch.float64)).tolist()
    assert got[0] == 1.0  # noise-free: a bigger batch gains nothing
    assert got[1] == 8.0  # no detectable signal: linear scaling
    assert got[2] == pytest.approx(8.0)
    assert AdaScaleRule(1.0).factor(rho, torch.ones(3)).tolist() == [1.0, 1.0, 1.0]


def _micro_batch_run(rule_kwargs, steps=12, parts=4, seed=0, **kwargs):
    """A same-point scaler on a linear regression, ``parts`` micro-batches per step."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    vgs = VarianceGradientScaler(
        model.named_parameters(),
        statistic="same_point",
        beta=0.5,
        confidence=None,
        optimizer=opt,
        **rule_kwargs,
        **kwargs,
    )
    g = torch.Generator().manual_seed(seed)
    factors, lrs = [], []
    for _ in range(steps):
        x = torch.randn(64, 5, generator=g, dtype=torch.float64)
        y = x.sum(1) + 2.0 * torch.randn(64, generator=g, dtype=torch.float64)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(parts), y.chunk(parts), strict=True):
            (torch.nn.functional.mse_loss(model(xs).squeeze(1), ys) / parts).backward()
        vgs.step()
        factors.append((vgs.get_scaling_factor(), vgs.get_normalized_variance()))
        with vgs.apply(opt):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
    return vgs, factors, lrs


def test_adascale_scaler_applies_the_gain_of_its_own_rho_to_the_learning_rate():
    vgs, factors, lrs = _micro_batch_run(
        {"rule": "adascale", "batch_size": 64, "base_batch_size": 8}, apply_to="lr"
    )
    measured = [(f, r) for f, r in factors if not math.isnan(r)]
    assert measured, "the same-point estimate never arrived"
    for (factor, rho), lr in zip(factors, lrs, strict=True):
        expected = 1.0 if math.isnan(rho) else (1 + 8 * rho) / (1 + rho)
        assert factor == pytest.approx(expected, rel=1e-12)
        assert lr == pytest.approx(0.01 * factor, rel=1e-12)
        assert 1.0 <= factor <= 8.0
    # the progress clock is the sum of the applied gains
    assert float(vgs.progress) == pytest.approx(sum(f for f, _ in factors), rel=1e-12)
    row = vgs.statistics()["global"]
    assert row.progress == pytest.approx(float(vgs.progress))


def test_scale_given_directly_equals_scale_from_batch_sizes():
    a, fa, _ = _micro_batch_run({"rule": "adascale", "batch_size": 64, "base_batch_size": 16})
    b, fb, _ = _micro_batch_run({"rule": "adascale", "scale": 4.0})
    assert fa == fb
    assert float(a.progress) == float(b.progress)


def test_progress_skips_skipped_updates_and_resumes_bitwise():
    named = params_like(6)
    g = torch.Generator().manual_seed(3)
    steps = [[torch.randn(6, generator=g, dtype=torch.float64) + 1.0] for _ in range(10)]
    vgs = feed(
        make(named, rule="adascale", scale=4.0, beta=0.8, statistic="temporal"), named, steps[:5]
    )
    before = float(vgs.progress)
    feed(vgs, named, steps[5:6], skip=True)
    assert float(vgs.progress) == before  # a skipped optimizer step makes no progress
    saved = vgs.state_dict()
    feed(vgs, named, steps[6:])
    resumed = make(named, rule="adascale", scale=4.0, beta=0.8, statistic="temporal")
    resumed.load_state_dict(saved)
    assert float(resumed.progress) == before
    feed(resumed, named, steps[6:])
    assert_same(resumed.state_dict(), vgs.state_dict())


def test_checkpoints_without_progress_start_at_the_applied_updates():
    named = params_like(3)
    steps = [[torch.tensor([1.0, 2.0, 3.0]) + k] for k in range(4)]
    vgs = feed(make(named, statistic="temporal", rule="shrink"), named, steps)
    saved = vgs.state_dict()
    del saved["progress"]
    other = make(named, statistic="temporal", rule="shrink")
    other.load_state_dict(saved)
    assert float(other.progress) == 4.0


def test_shrink_default_never_makes_a_zero_step_without_signal():
    """Pure noise (the signal estimate is <= 0): the default min_scale=0 keeps the previous
    factor instead of the 1/(1 + ∞) = 0 step of the original."""
    named = params_like(4)
    steps = [[torch.tensor([1.0, -1.0, 1.0, -1.0]) * (-1) ** k] for k in range(6)]
    vgs = feed(make(named, beta=0.5, statistic="temporal", rule="shrink"), named, steps)
    row = vgs.statistics()["global"]
    assert row.no_signal
    assert row.factor == 1.0  # the factor before any signal was measured
    assert float(vgs.progress) == 6.0


def test_shrink_rule_is_the_original_formula():
    rule = ShrinkRule(alpha=2.0, min_scale=0.1)
    rho = torch.tensor([0.0, 1.0, 100.0, math.inf], dtype=torch.float64)
    assert rule.factor(rho, torch.ones(4)).tolist() == pytest.approx([1.0, 1 / 3, 0.1, 0.1])


def test_read_out_of_the_critical_batch_size():
    vgs, _, _ = _micro_batch_run({"rule": "shrink", "batch_size": 64})
    row = vgs.statistics()["global"]
    assert row.B_noise == pytest.approx(row.normalized_variance * 64, rel=1e-12)
    n_eff = row.effective_sample_size
    assert row.B_noise_se == pytest.approx(row.B_noise * math.sqrt(2 / (n_eff - 1)), rel=1e-12)
    assert row.suggested_batch_size == max(1, round(row.B_noise))
    seen = {}
    logged = VarianceGradientScaler(
        params_like(3),
        batch_size=32,
        log_every=1,
        logger=lambda m, step: seen.update(m),
        statistic="temporal",
        rule="shrink",
    )
    named = list(zip(logged.layout.names, logged.layout.tensors, strict=True))
    feed(logged, named, [[torch.tensor([1.0, 2.0, 3.0]) * (1 + 0.1 * k)] for k in range(12)])
    for key in ("vgs/B_noise", "vgs/B_noise_se", "vgs/suggested_batch_size", "vgs/progress"):
        assert key in seen


def test_no_batch_size_means_no_critical_batch_read_out():
    named = params_like(3)
    vgs = feed(
        make(named, statistic="temporal", rule="shrink"),
        named,
        [[torch.tensor([1.0, 2.0, 3.0]) * k] for k in range(1, 6)],
    )
    row = vgs.statistics()["global"]
    assert row.B_noise is None
    assert row.B_noise_se is None
    assert row.suggested_batch_size is None


class _Half:
    name: ClassVar[str] = "test-half"

    @classmethod
    def from_config(cls, config):
        return cls()

    def factor(self, rho, previous):
        return torch.full_like(rho, 0.5)


def test_a_registered_rule_is_usable_by_name():
    register_rule(_Half)
    assert "test-half" in registered_rules()
    named = params_like(3)
    vgs = feed(
        make(named, rule="test-half", statistic="temporal"),
        named,
        [[torch.ones(3) * k] for k in range(1, 5)],
    )
    assert vgs.get_scaling_factor() == 0.5


def test_registry_refuses_a_taken_name_and_a_nameless_rule():
    class Other(_Half):
        name: ClassVar[str] = "shrink"

    with pytest.raises(ConfigurationError, match="already registered"):
        register_rule(Other)
    with pytest.raises(ConfigurationTypeError, match="non-empty str name"):
        register_rule(type("Nameless", (), {}))


def test_config_object_is_accepted_and_not_mixed_with_keywords():
    named = params_like(3)
    config = ScalerConfig(rule="adascale", scale=2.0, beta=0.9, statistic="temporal")
    vgs = VarianceGradientScaler(named, config=config)
    assert vgs.config is config
    with pytest.raises(ConfigurationError, match="not both; got config and beta"):
        VarianceGradientScaler(named, config=config, beta=0.5)
    with pytest.raises(ConfigurationTypeError, match="config must be a ScalerConfig"):
        VarianceGradientScaler(named, config={"rule": "adascale"})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rule": "linear"}, ConfigurationError, "rule must be one of 'shrink', 'adascale'"),
        ({"rule": "adascale", "base_batch_size": 8}, ConfigurationError, "needs the batch scale"),
        ({"rule": "adascale", "base_batch_size": 0, "batch_size": 8}, ConfigurationError,
         "base_batch_size must be a positive int; got 0"),
        ({"rule": "adascale", "base_batch_size": -4, "batch_size": 8}, ConfigurationError,
         "base_batch_size must be a positive int"),
        ({"rule": "adascale", "base_batch_size": True}, ConfigurationTypeError,
         "base_batch_size must be an int"),
        ({"rule": "adascale", "scale": 0.0}, ConfigurationError, "scale must be a finite number"),
        ({"rule": "adascale", "scale": math.inf}, ConfigurationError, "finite number > 0"),
        ({"rule": "adascale", "scale": "2"}, ConfigurationTypeError, "scale must be a number"),
        ({"rule": "adascale", "scale": 2.0, "base_batch_size": 4}, ConfigurationError,
         "not both"),
        ({"rule": "adascale", "scale": 2.0, "alpha": 2.0}, ConfigurationError,
         "alpha and min_scale belong to rule='shrink'"),
        ({"rule": "adascale", "scale": 2.0, "min_scale": 0.1}, ConfigurationError,
         "belong to rule='shrink'"),
        ({"rule": "shrink", "scale": 2.0}, ConfigurationError, "belong to rule='adascale'"),
        ({"rule": "shrink", "base_batch_size": 8, "batch_size": 16}, ConfigurationError,
         "belong to rule='adascale'"),
    ],
)  # fmt: skip
def test_bad_rule_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        ScalerConfig(**kwargs)
    with pytest.raises(error, match=match):
        VarianceGradientScaler(params_like(2), **kwargs)


def test_progress_follows_the_rate_limited_factor_with_param_groups():
    """With aggregate="param_group" the clock advances by the model-wide factor under the same
    rate limit as the applied ones (it used to ignore max_rate and run far ahead)."""
    a = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    groups = [{"params": [("a", a)]}, {"params": [("b", b)]}]
    g = torch.Generator().manual_seed(0)
    vgs = VarianceGradientScaler(
        groups, rule="adascale", scale=8.0, aggregate="param_group", max_rate=0.01, beta=0.5,
        confidence=None, statistic="temporal",
    )  # fmt: skip
    applied = []
    for _ in range(30):
        a.grad = 0.1 + torch.randn(4, generator=g, dtype=torch.float64)
        b.grad = 0.1 + torch.randn(3, generator=g, dtype=torch.float64)
        vgs.step()
        applied.append(vgs.get_scaling_factor())
    assert float(vgs.progress) == pytest.approx(sum(applied), rel=1e-12)
    assert max(applied) <= math.exp(0.01 * 30) + 1e-12  # the rate limit holds on the clock
    saved = vgs.state_dict()
    assert saved["overall_factor"].shape == (1,)


def test_negative_noise_estimates_never_leave_the_rules_range():
    """An unbiased noise estimate below zero is a noise-free gradient (ρ = 0), not a factor
    outside [1, S] or a zero step."""
    rho = torch.tensor([-0.5, -1e-3], dtype=torch.float64)
    assert AdaScaleRule(8.0).factor(rho, torch.ones(2)).tolist() == [1.0, 1.0]
    named = params_like(2)
    steps = [[torch.tensor([1.0, 1.0]) * (1.0 + 1e-9 * k)] for k in range(8)]
    vgs = feed(
        make(named, rule="adascale", scale=4.0, beta=0.5, statistic="temporal"), named, steps
    )
    assert 1.0 <= vgs.get_scaling_factor() <= 4.0


def test_a_checkpoint_from_another_rule_is_refused_unless_adopted():
    named = params_like(3)
    steps = [[torch.randn(3, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
              + 0.01] for k in range(12)]  # fmt: skip
    ada = feed(
        make(named, rule="adascale", scale=8.0, beta=0.5, statistic="temporal"), named, steps
    )
    saved = ada.state_dict()
    assert float(saved["factor"][0]) > 1.0
    shrink = make(named, beta=0.5, statistic="temporal", rule="shrink")
    with pytest.raises(StateError, match=r"outside \[0.0, 1.0\], the range of rule='shrink'"):
        shrink.load_state_dict(saved)
    assert shrink.updates == 0
    shrink.load_state_dict(saved, use_checkpoint_config=True)
    assert shrink.config.rule == "adascale"
    assert torch.equal(shrink.scaling_factors(), saved["factor"])


def test_a_failed_rebind_leaves_the_scaler_as_it_was():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    vgs = VarianceGradientScaler(
        model.named_parameters(),
        statistic="per_sample",
        model=model,
        confidence=None,
        rule="shrink",
    )
    x = torch.randn(8, 3, dtype=torch.float64)
    for _ in range(4):
        model.zero_grad()
        model(x).pow(2).mean().backward()
        vgs.step()
    before = vgs.state_dict()
    fresh = torch.nn.Linear(3, 1).double()
    with pytest.raises(ConfigurationError):  # new parameters, old model: refused
        vgs.rebind(fresh.named_parameters())
    assert_same(vgs.state_dict(), before)
    model.zero_grad()
    model(x).pow(2).mean().backward()
    vgs.step()  # the hooks are back on the old model
    assert vgs.updates == 5
    with pytest.raises(ConfigurationError, match=r"rebind\(model=\.\.\.\) is for"):
        VarianceGradientScaler(
            model.named_parameters(), statistic="temporal", rule="shrink"
        ).rebind(model.named_parameters(), model=model)
