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
    MAX_STEP,
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
    delta = min(max(gain * (smoothed - target), -MAX_STEP), MAX_STEP)
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
        assert abs(applied) <= MAX_STEP + 1e-15  # bounded updates
    assert ctl.updates == 9


def test_lambda_rises_above_the_target_and_falls_below_it():
    up = ContractionController(0.5, 0.1)
    down = ContractionController(0.5, 0.1)
    for _ in range(5):
        up.update(0.9)
        down.update(0.1)
    assert up.jac_penalty > 0.1 > down.jac_penalty
    assert up.jac_penalty == pytest.approx(0.1 * math.exp(5 * MAX_STEP))  # |k(q - q*)| > δ
    assert down.jac_penalty == pytest.approx(0.1 * math.exp(-5 * MAX_STEP))


def test_updates_are_clipped_to_the_bounds():
    ctl = ContractionController(0.5, 5.0, gain=100.0)
    for _ in range(200):
        ctl.update(0.99)
    assert ctl.jac_penalty == pytest.approx(LAMBDA_MAX)
    for _ in range(1000):
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
        final_residual=torch.tensor([1e-4, 2e-4, 0.5]),
        steps=torch.tensor([4, 8, 0]),  # the third sample never moved: left out
    )
    total, count = observed_rate(stats)
    expected = (math.log(1e-4) / 4 + math.log(1e-4) / 8) / 2
    assert count == 2
    assert total / count == pytest.approx(expected, rel=1e-12)


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
