"""The trainer: bitwise resume, one objective, checkpoints, divergence handling, bad input."""

import json

import pytest
import torch

from gradstats.eqprop import relax
from gradstats.eqprop.train import (
    TrainConfig,
    TrainingDiverged,
    build_from_checkpoint,
    evaluate,
    load_checkpoint,
    read_metrics,
    train,
)

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 40


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return str(path)


def config(tmp_path, data, name="run", **kw):
    base = {
        "method": "aep",
        "steps": 4,
        "out": tmp_path / name,
        "data": data,
        "d_model": 16,
        "n_heads": 2,
        "block_size": 12,
        "batch_size": 3,
        "t1": 30,
        "t2": 60,
        "eval_every": 2,
        "eval_batches": 1,
        "spot_check_every": 2,
        "checkpoint_every": 2,
        "progress": False,
        "init_std": 0.1,
    }
    return TrainConfig(**{**base, **kw})


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


@pytest.mark.parametrize("method", ["aep", "bptt", "backprop"])
def test_resume_is_bitwise(tmp_path, data, method):
    full = train(config(tmp_path, data, "full", method=method))
    train(config(tmp_path, data, "parts", method=method), until=2)
    resumed = train(config(tmp_path, data, "parts", method=method, resume=True))
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["step"] == b["step"] == 4
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert _without_time(read_metrics(full.metrics)) == _without_time(read_metrics(resumed.metrics))
    assert torch.equal(a["rng"]["data"], b["rng"]["data"])


def test_run_folder_and_checkpoint_format(tmp_path, data):
    result = train(config(tmp_path, data))
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["format"] == "gradstats.eqprop.train"
    assert state["version"] == 1
    assert state["config"]["method"] == "aep"
    assert state["model_class"] == "EquilibriumTransformer"
    assert set(state["rng"]) == {"data", "noise", "torch"}
    assert state["world_size"] == 1  # a single process (torchrun runs record their N)
    assert result.curves.exists()
    records = read_metrics(result.metrics)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"train_ce", "res_free", "res_adjoint", "steps_adjoint", "unconverged"} <= set(
        records[0]
    )
    assert records[1]["cos_implicit_min"] > 0.99  # the spot-check against the implicit gradient
    assert "val_ce" in records[1]
    model = build_from_checkpoint(state)
    assert model.config()["d_model"] == 16


def test_validation_evaluates_the_state_the_estimator_used(tmp_path, data):
    """One objective: val CE is the loss at relax() with the run's free-phase settings."""
    cfg = config(tmp_path, data, method="bptt")
    result = train(cfg)
    model = build_from_checkpoint(load_checkpoint(result.checkpoint))
    from gradstats.data import load_corpus

    corpus = load_corpus(data)
    x, y = corpus.batch("val", 3, 12, generator=torch.Generator().manual_seed(cfg.seed + 3))
    z, stats = relax(model, x, tol=0.0, max_steps=cfg.t1)
    assert stats.steps.tolist() == [cfg.t1] * 3  # bptt's objective: exactly T1 steps
    expected = float(model.loss(z, y).detach()) / y.numel()
    assert evaluate(model, cfg, corpus) == pytest.approx(expected, rel=1e-6)


def test_stabilisers_are_applied_and_logged(tmp_path, data):
    result = train(config(tmp_path, data, jac_penalty=0.1, homeostasis=0.05, res_penalty=0.1))
    record = read_metrics(result.metrics)[0]
    for name in ("jacobian", "asymmetry", "residual"):
        value, scale = record[f"penalty.{name}"]
        assert value > 0
        assert scale > 0


def test_holomorphic_training_runs(tmp_path, data):
    result = train(config(tmp_path, data, method="holomorphic", steps=2))
    assert read_metrics(result.metrics)[-1]["res_adjoint"] > 0


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, data):
    cfg = config(tmp_path, data, method="bptt", lr=1e30, warmup=0, grad_clip=0.0, steps=20,
                 max_skips=2, checkpoint_every=1, eval_every=1)  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"diverged at step 1 .*checkpoint \(step 0\)"):
        train(cfg)
    state = load_checkpoint(cfg.out)
    assert state["step"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_resume_with_a_different_option_is_rejected(tmp_path, data):
    train(config(tmp_path, data), until=2)
    with pytest.raises(ValueError, match=r"lr=0.1 \(run: 0.003\)"):
        train(config(tmp_path, data, resume=True, lr=0.1))


def test_existing_run_needs_resume(tmp_path, data):
    train(config(tmp_path, data, steps=1))
    with pytest.raises(ValueError, match="already holds a run"):
        train(config(tmp_path, data, steps=1))


def test_missing_checkpoint(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(config(tmp_path, data, resume=True))


def test_corrupt_checkpoint(tmp_path, data):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train(config(tmp_path, data, resume=True))


def test_foreign_checkpoint(tmp_path, data):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"weights": torch.zeros(2)}, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a gradstats training checkpoint"):
        load_checkpoint(run)


def test_data_too_short_for_the_block_size(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("to be or not to be")
    with pytest.raises(ValueError, match="fewer than block_size \\+ 1 = 13"):
        train(config(tmp_path, str(path)))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"method": "sgd"}, "method must be one of"),
        ({"method": "holomorphic", "attn_mode": "real"}, r"EquilibriumTransformer\(mode='real'\)"),
        ({"lr": -1.0}, "lr must be a finite number > 0"),
        ({"d_model": 10, "n_heads": 4}, "divisible"),
        ({"method": "backprop", "jac_penalty": 0.1}, "penalties act on the equilibrium force"),
    ],
)
def test_bad_options(tmp_path, data, kw, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, data, **kw)


def test_config_round_trips_through_the_checkpoint(tmp_path, data):
    cfg = config(tmp_path, data, beta=0.1, tol_adjoint=1e-3)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
