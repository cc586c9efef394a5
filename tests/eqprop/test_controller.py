"""Adaptive stabilisation: the contraction controller's law, a real run, resume and bad input."""

import itertools
import math

import pytest
import torch

from gradstats.cli import main
from gradstats.eqprop.train import TrainConfig, load_checkpoint, read_metrics, train
from gradstats.eqprop.train._checkpoint import save_checkpoint
from gradstats.eqprop.train._controller import (
    LAMBDA_MAX,
    LAMBDA_MIN,
    MAX_STEP_DOWN,
    MAX_STEP_UP,
    SMOOTHING,
    ContractionController,
    observed_rate,
)
from gradstats.errors import ConfigurationError, StateError

SMALL = ["--method", "aep", "--d-model", "8", "--n-heads", "2", "--block-size", "6",
         "--batch-size", "2", "--t2", "40", "--eval-every", "2", "--eval-batches", "1",
         "--checkpoint-every", "2", "--spot-check-every", "0", "--no-progress"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("no_plot")  # curves.png: slow, not tested here


def _cfg(tmp_path, data, name="run", **kw):
    base = {"method": "aep", "steps": 4, "out": tmp_path / name, "data": data, "d_model": 16,
            "n_heads": 2, "block_size": 12, "batch_size": 3, "t1": 30, "t2": 60,
            "eval_every": 2, "eval_batches": 1, "spot_check_every": 0, "checkpoint_every": 2,
            "progress": False, "init_std": 0.1, "jac_penalty": 0.1, "res_penalty": 0.5,
            "contraction_target": 0.05, "controller_gain": 5.0}  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _cli(tmp_path, data, *extra, name="run"):
    return main(["eqprop", "train", "--data", data, "--out", str(tmp_path / name), *SMALL, *extra])


# ------------------------------------------------------------------------------ the law
def _law(log_lam, smoothed, q, target, gain):
    smoothed = q if smoothed is None else SMOOTHING * smoothed + (1 - SMOOTHING) * q
    delta = min(max(gain * (max(q, smoothed) - target), -MAX_STEP_DOWN), MAX_STEP_UP)
    return min(max(log_lam + delta, math.log(LAMBDA_MIN)), math.log(LAMBDA_MAX)), smoothed


def test_the_law_on_a_synthetic_sequence():
    ctl = ContractionController(0.6, 0.1, gain=0.3)
    log_lam, smoothed = math.log(0.1), None
    for q in [0.9, 0.95, 0.7, 0.5, 0.2, 0.1, 0.3, 0.61, 0.99]:
        before = ctl.log_lambda
        applied = ctl.update(q)
        log_lam, smoothed = _law(log_lam, smoothed, q, 0.6, 0.3)
        assert ctl.log_lambda == pytest.approx(log_lam, abs=1e-15)
        assert ctl.smoothed == pytest.approx(smoothed, abs=1e-15)
        assert applied == pytest.approx(ctl.log_lambda - before, abs=1e-15)
        assert -MAX_STEP_DOWN - 1e-15 <= applied <= MAX_STEP_UP + 1e-15  # bounded updates
    assert ctl.updates == 9


def test_the_law_by_hand():
    # q* = 0.3, k = 1, λ_0 = 0.1: every number below is the formula written out.
    ctl = ContractionController(0.3, 0.1)
    assert ctl.update(0.35) == pytest.approx(0.05)  # q̄ = q = 0.35: e = 0.05, under δ↑
    assert ctl.smoothed == pytest.approx(0.35)
    # q = 0.2 < q* but q̄ = 0.9·0.35 + 0.1·0.2 = 0.335 > q*: e = max(q, q̄) − q* = 0.035, up
    assert ctl.update(0.2) == pytest.approx(0.035)
    assert ctl.smoothed == pytest.approx(0.335)
    # q = 0.9 (raw spike): q̄ = 0.3915, but e = 0.9 − 0.3 = 0.6 → clipped to δ↑ = 0.25
    assert ctl.update(0.9) == pytest.approx(MAX_STEP_UP)
    assert ctl.smoothed == pytest.approx(0.3915)
    assert ctl.jac_penalty == pytest.approx(0.1 * math.exp(0.05 + 0.035 + 0.25))
    # q = 0.1: q̄ = 0.36235 > q*, still up by 0.06235
    assert ctl.update(0.1) == pytest.approx(0.06235)
    low = ContractionController(0.3, 0.1)
    assert low.update(0.295) == pytest.approx(-0.005)  # both below, |k·e| < δ↓: exact
    assert low.update(0.0) == pytest.approx(-MAX_STEP_DOWN)  # e = 0.2655 − 0.3: clipped to δ↓
    assert low.jac_penalty == pytest.approx(0.1 * math.exp(-0.015))


def test_the_raw_rate_tightens_without_smoothing_lag():
    ctl = ContractionController(0.3, 0.1, gain=0.5)
    for _ in range(50):
        ctl.update(0.05)
    assert ctl.smoothed == pytest.approx(0.05)
    before = ctl.log_lambda
    assert ctl.update(0.7) == pytest.approx(0.5 * (0.7 - 0.3))  # not 0.5·(0.115 − 0.3)
    assert ctl.log_lambda - before == pytest.approx(0.2)


def test_lambda_rises_fast_above_the_target_and_falls_slowly_below_it():
    up = ContractionController(0.5, 0.1)
    down = ContractionController(0.5, 0.1)
    for _ in range(5):
        up.update(0.9)
        down.update(0.1)
    assert up.jac_penalty > 0.1 > down.jac_penalty
    assert up.jac_penalty == pytest.approx(0.1 * math.exp(5 * 0.25))  # k(q - q*) = 0.4 > δ↑
    assert down.jac_penalty == pytest.approx(0.1 * math.exp(-5 * 0.01))  # −0.4 < −δ↓
    assert (MAX_STEP_UP, MAX_STEP_DOWN) == (0.25, 0.01)


def test_custom_rate_limits_and_bad_ones():
    up = ContractionController(0.5, 0.1, max_step_up=0.1, max_step_down=0.02)
    assert up.update(0.9) == pytest.approx(0.1)
    assert up.update(0.0) == pytest.approx(0.1)  # q̄ = 0.81: still above q*, up by δ↑
    down = ContractionController(0.5, 0.1, max_step_up=0.1, max_step_down=0.02)
    assert down.update(0.1) == pytest.approx(-0.02)
    for bad in ({"max_step_up": 0.0}, {"max_step_down": -0.01}):
        with pytest.raises(ConfigurationError, match="max_step"):
            ContractionController(0.5, 0.1, **bad)


def test_updates_are_clipped_to_the_bounds():
    ctl = ContractionController(0.5, 5.0, gain=100.0)
    for _ in range(200):
        ctl.update(0.99)
    assert ctl.jac_penalty == pytest.approx(LAMBDA_MAX)
    assert ctl.update(0.99) == 0.0  # pinned: the applied step is what the bound allows
    n = math.ceil(math.log(LAMBDA_MAX / LAMBDA_MIN) / MAX_STEP_DOWN)  # 1152 steps at δ↓
    for _ in range(n + 100):
        ctl.update(0.01)
    assert ctl.jac_penalty == pytest.approx(LAMBDA_MIN)


def test_no_signal_holds_the_weight():
    ctl = ContractionController(0.5, 0.1)
    assert ctl.update(None) == 0.0
    assert ctl.update(math.nan) == 0.0
    assert (ctl.updates, ctl.smoothed) == (0, None)


def test_residual_weight_follows_in_proportion_and_homeostasis_stays():
    ctl = ContractionController(0.5, 0.1, res_penalty=1.0)
    fixed = {"jacobian": 0.1, "asymmetry": 0.05, "residual": 1.0}
    for _ in range(4):
        ctl.update(0.9)
    w = ctl.weights(fixed)
    assert w["jacobian"] == ctl.jac_penalty
    assert w["residual"] == pytest.approx(10 * ctl.jac_penalty)
    assert w["asymmetry"] == 0.05


def test_observed_rate_is_the_geometric_mean_of_per_sample_rates():
    from types import SimpleNamespace

    stats = SimpleNamespace(
        trace=torch.tensor([[1.0, 2.0, 1.0], [0.5, 0.1, 0.1]]),
        trace_steps=(0, 2),
        final_residual=torch.tensor([1e-4, 2e-4, 0.5]),
        steps=torch.tensor([4, 8, 0]),  # the third sample never moved: left out
        tol=1e-3,
    )
    total, count = observed_rate(stats)
    expected = (math.log(1e-4) / 4 + math.log(1e-4) / 8) / 2
    assert count == 2
    assert total / count == pytest.approx(expected, rel=1e-12)


def test_a_fixed_unroll_is_read_up_to_its_first_check_below_tol():
    from types import SimpleNamespace

    # BPTT-like: 30 steps always, checks at 0, 10, 20 and the final state at 30; tol 1e-4.
    stats = SimpleNamespace(
        trace=torch.tensor(
            [[1.0, 1.0, 1.0], [1e-5, 1e-2, 1e-3], [1e-7, 1e-3, 1e-3], [1e-7, 2e-4, 1e-4]]
        ),
        trace_steps=(0, 10, 20, 30),
        final_residual=torch.tensor([1e-7, 2e-4, 1e-4]),
        steps=torch.tensor([30, 30, 30]),
        tol=1e-4,
    )
    total, count = observed_rate(stats)
    # sample 0 reached tol at check 10 (then sat at the float floor): its rate is (1e-5)^(1/10);
    # samples 1 and 2 reached it at no check before T = 30: their final residual over 30 steps
    expected = math.log(1e-5) / 10 + math.log(2e-4) / 30 + math.log(1e-4) / 30
    assert count == 3
    assert total == pytest.approx(expected, rel=1e-12)
    stats.tol = 0.0  # a phase without tolerance: the final residual for every sample
    total, _ = observed_rate(stats)
    assert total == pytest.approx(math.log(1e-7 * 2e-4 * 1e-4) / 30, rel=1e-12)


# ------------------------------------------------------------------------ a real run
def test_a_run_moves_and_logs_the_weight(tmp_path, data):
    cfg = _cfg(tmp_path, data)
    result = train(cfg)
    records = read_metrics(result.metrics)
    lams = [r["jac_penalty"] for r in records]
    assert lams[0] == pytest.approx(0.1)
    assert lams[-1] != pytest.approx(lams[0])  # the controller acted
    log_lam, smoothed = math.log(0.1), None
    for record, nxt in itertools.pairwise(records):
        assert 0 < record["contraction"] < 1
        log_lam, smoothed = _law(log_lam, smoothed, record["contraction"], 0.05, 5.0)
        assert record["contraction_smoothed"] == pytest.approx(smoothed)
        assert nxt["jac_penalty"] == pytest.approx(math.exp(log_lam))
        assert nxt["res_penalty"] == pytest.approx(5 * nxt["jac_penalty"])
    state = load_checkpoint(result.checkpoint)
    assert state["controller"]["updates"] == 4


def test_fixed_weights_stay_the_default(tmp_path, data):
    cfg = _cfg(tmp_path, data, contraction_target=None, controller_gain=1.0, steps=2)
    result = train(cfg)
    records = read_metrics(result.metrics)
    assert "jac_penalty" not in records[0]
    assert 0 < records[0]["contraction"] < 1  # the signal is logged anyway
    assert "controller" not in load_checkpoint(result.checkpoint)


def test_resume_is_bitwise_with_controller_and_ema(tmp_path, data):
    full = train(_cfg(tmp_path, data, "full", ema_decay=0.7))
    train(_cfg(tmp_path, data, "parts", ema_decay=0.7), until=2)
    resumed = train(_cfg(tmp_path, data, "parts", ema_decay=0.7, resume=True))
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, tensor in a["ema"]["params"].items():
        assert torch.equal(tensor, b["ema"]["params"][name]), name
    assert a["ema"]["count"] == b["ema"]["count"] == 4
    assert a["controller"] == b["controller"]

    def strip(records):
        return [{k: v for k, v in r.items() if k != "time"} for r in records]

    assert strip(read_metrics(full.metrics)) == strip(read_metrics(resumed.metrics))


def test_a_checkpoint_without_controller_state_is_refused(tmp_path, data):
    result = train(_cfg(tmp_path, data, steps=2))
    state = load_checkpoint(result.checkpoint)
    del state["controller"]
    save_checkpoint(result.checkpoint, {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(StateError, match="misses its controller state"):
        train(_cfg(tmp_path, data, steps=4, resume=True))


def test_old_checkpoints_without_the_new_options_resume(tmp_path, data):
    base = {"contraction_target": None, "controller_gain": 1.0, "steps": 2}
    train(_cfg(tmp_path, data, **base))
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    for key in ("contraction_target", "controller_gain", "ema_decay"):
        del state["config"][key]  # what an older gradstats wrote
    save_checkpoint(path, {k: v for k, v in state.items() if k != "format"})
    result = train(_cfg(tmp_path, data, **{**base, "steps": 4, "resume": True}))
    assert result.step == 4


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("value", ["0", "1", "-0.1", "nan", "1.5"])
def test_bad_contraction_target_exits_2_with_one_line(tmp_path, data, capsys, value):
    assert _cli(tmp_path, data, "--jac-penalty", "0.1", "--contraction-target", value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "contraction_target" in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["1.0", "-0.1", "nan"])
def test_bad_ema_decay_exits_2_with_one_line(tmp_path, data, capsys, value):
    assert _cli(tmp_path, data, "--ema-decay", value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "ema_decay" in err[0], err


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"jac_penalty": 0.0}, r"jac_penalty \(--jac-penalty\) must lie in \[0.0001, 10\]"),
        ({"jac_penalty": 100.0}, r"must lie in \[0.0001, 10\], the controller's range; got 100"),
        ({"contraction_target": None}, "controller_gain is used only with"),
        ({"controller_gain": 0.0}, "controller_gain must be"),
        ({"method": "backprop", "jac_penalty": 0.0, "res_penalty": 0.0, "t2": 100},
         "does not use contraction_target"),
    ],
)  # fmt: skip
def test_inconsistent_controller_options(tmp_path, data, kw, match):
    with pytest.raises(ConfigurationError, match=match):
        _cfg(tmp_path, data, **kw)


@pytest.mark.parametrize(
    ("option", "trained", "given"),
    [("--contraction-target", "0.5", "0.6"), ("--ema-decay", "0.9", "0.99")],
)
def test_resume_refuses_another_target_or_decay(tmp_path, data, capsys, option, trained, given):
    common = ["--jac-penalty", "0.1", "--contraction-target", "0.5"]
    first = [*common[:2], option, trained] if option != common[2] else common
    assert _cli(tmp_path, data, "--steps", "2", *first) == 0
    capsys.readouterr()
    assert _cli(tmp_path, data, "--steps", "4", "--resume", option, given) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert option.lstrip("-").replace("-", "_") in err[0], err


def test_bptt_reads_the_same_rate_as_the_free_phase(tmp_path, data):
    # BPTT runs past its tolerance; its trace uses the free solver's check schedule, so the
    # first step's rate (same initial weights and batch) equals the AEP free phase's.
    rates = {}
    for method in ("aep", "bptt"):
        extra = {} if method == "aep" else {"t2": 100}  # (the default: unused)
        cfg = _cfg(tmp_path, data, method, method=method, steps=1, **extra)
        rates[method] = read_metrics(train(cfg).metrics)[0]["contraction"]
    assert rates["bptt"] == pytest.approx(rates["aep"], rel=1e-6)
    assert 0 < rates["aep"] < 0.5  # not the precision floor over 10 steps
