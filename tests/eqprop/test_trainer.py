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
from gradstats.errors import (
    ConfigurationError,
    ConfigurationTypeError,
    DivergenceError,
    StateError,
)


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
    if kw.get("method") in ("bptt", "backprop"):
        del base["t2"]  # no nudged/adjoint phase: setting t2 is an error
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


@pytest.mark.filterwarnings("ignore::gradstats.eqprop.ConvergenceWarning")  # t1=2 on purpose
def test_stabilisers_are_applied_and_logged(tmp_path, data):
    weights = {"jac_penalty": 0.1, "homeostasis": 0.05, "res_penalty": 0.1}
    result = train(config(tmp_path / "short", data, t1=2, **weights))  # free phase unconverged
    record = read_metrics(result.metrics)[0]
    assert record["unconverged"] > 0
    for name in ("jacobian", "asymmetry", "residual"):
        value, scale = record[f"penalty.{name}"]
        assert value > 0
        assert scale > 0
    # converged: the residual penalty (a hinge at the tolerance) is exactly zero, and so is
    # its scale; the Jacobian terms still act
    record = read_metrics(train(config(tmp_path / "long", data, **weights)).metrics)[0]
    assert record["res_free"] <= 1e-5
    assert record["penalty.residual"] == [0.0, 0.0]
    assert record["penalty.jacobian"][0] > 0


def test_spectral_jacobian_penalty_is_applied_logged_and_resumed(tmp_path, data):
    spectral = {"jac_penalty": 0.1, "jac_norm": "spectral", "power_iterations": 4}
    fro = read_metrics(train(config(tmp_path / "fro", data, jac_penalty=0.1)).metrics)[0]
    full = train(config(tmp_path, data, "full", **spectral))
    first = read_metrics(full.metrics)[0]
    value, scale = first["penalty.jacobian"]
    # the same first state and batch: ½σ_max² is below the Hutchinson ½‖J‖²_F (n = 192 here)
    assert 0 < value < fro["penalty.jacobian"][0]
    assert scale > 0
    train(config(tmp_path, data, "parts", **spectral), until=2)
    resumed = train(config(tmp_path, data, "parts", resume=True, **spectral))
    assert _without_time(read_metrics(full.metrics)) == _without_time(read_metrics(resumed.metrics))
    assert load_checkpoint(resumed.checkpoint)["config"]["jac_norm"] == "spectral"
    # the iteration count reaches the penalty: from the same start, more steps give more
    none = {**spectral, "power_iterations": 0}
    raw = read_metrics(train(config(tmp_path, data, "k0", steps=1, **none)).metrics)[0]
    assert raw["penalty.jacobian"][0] < value
    bounded = train(config(tmp_path, data, "bounded", steps=1, jac_bound=10.0, **spectral))
    assert read_metrics(bounded.metrics)[0]["penalty.jacobian"] == [0.0, 0.0]  # σ_max < 10


def test_holomorphic_training_runs(tmp_path, data):
    result = train(config(tmp_path, data, method="holomorphic", steps=2))
    assert read_metrics(result.metrics)[-1]["res_adjoint"] > 0


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, data):
    cfg = config(tmp_path, data, method="bptt", lr=1e30, warmup=0, grad_clip=0.0, steps=20,
                 max_skips=2, checkpoint_every=1, eval_every=1)  # fmt: skip
    with pytest.raises(
        TrainingDiverged, match=r"diverged at step 1 .*checkpoint \(step 0\)"
    ) as info:
        train(cfg)
    assert isinstance(info.value, DivergenceError)
    assert (info.value.phase, info.value.step) == ("train", 1)
    state = load_checkpoint(cfg.out)
    assert state["step"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_resume_with_a_different_option_is_rejected(tmp_path, data):
    train(config(tmp_path, data), until=2)
    with pytest.raises(ConfigurationError, match=r"lr=0.1 \(run: 0.003\)"):
        train(config(tmp_path, data, resume=True, lr=0.1))


def test_existing_run_needs_resume(tmp_path, data):
    train(config(tmp_path, data, steps=1))
    with pytest.raises(ConfigurationError, match="already holds a run"):
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
        ({"beta": float("nan")}, "beta must be a finite number > 0"),
        ({"grad_clip": float("inf")}, "grad_clip must be a finite number >= 0"),
        ({"d_model": 10, "n_heads": 4}, "divisible"),
        ({"method": "backprop", "jac_penalty": 0.1}, "penalties act on the equilibrium force"),
        ({"jac_norm": "nuclear"}, "jac_norm must be one of 'frobenius', 'spectral'"),
        ({"jac_norm": "spectral", "power_iterations": -1}, "power_iterations must be an int >= 0"),
        ({"power_iterations": 5}, "power_iterations=5 applies only with jac_norm='spectral'"),
        ({"jac_bound": 0.5}, "jac_bound=0.5 applies only with jac_norm='spectral'"),
        ({"jac_norm": "spectral", "jac_bound": -0.5}, "jac_bound must be a finite number >= 0"),
        (
            {"jac_norm": "spectral", "jac_bound": 0.5},
            r"jac_norm='spectral', jac_bound=0.5 set the "
            "Jacobian penalty, which is off: give --jac-penalty > 0",
        ),
        ({"method": "backprop", "jac_norm": "spectral"}, r"jac_norm='spectral' \(only aep"),
        ({"jac_norm": "loop"}, r"jac_norm='loop' set the Jacobian penalty, which is off"),
        (
            {"jac_norm": "loop", "jac_penalty": 0.1, "jac_bound": 0.5},
            "jac_bound=0.5 applies only with jac_norm='spectral'; got jac_norm='loop'",
        ),
    ],
)
def test_bad_options(tmp_path, data, kw, match):
    with pytest.raises(ConfigurationError, match=match):
        config(tmp_path, data, **kw)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"qk_norm": 1}, "qk_norm must be bool; got int"),
        ({"resume": "no"}, "resume must be bool; got str"),
        ({"progress": None}, "progress must be bool; got NoneType"),
        ({"method": 3}, "method must be str; got int"),
        ({"device": 0}, "device must be str; got int"),
        ({"out": 5}, "out must be Path; got int"),
        ({"data": 5}, "data must be str or None; got int"),
        ({"anchor": 1}, "anchor must be str or None; got int"),
        ({"steps": 2.0}, "steps must be an int"),
        ({"lr": "0.1"}, "lr must be a number; got str"),
        ({"jac_norm": 2}, "jac_norm must be str; got int"),
        ({"jac_norm": "spectral", "power_iterations": 2.0}, "power_iterations must be an int"),
    ],
)
def test_options_of_the_wrong_type_are_rejected(kw, match):
    with pytest.raises(ConfigurationTypeError, match=match):
        TrainConfig(**kw)


def test_paths_may_be_strings(tmp_path, data):
    cfg = config(tmp_path, data)
    again = TrainConfig(**{**cfg.to_dict(), "out": str(cfg.out)})
    assert again.out == cfg.out


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([["method", "aep"]], "a training config must be a mapping of options; got list"),
        (
            {"method": "aep", "lerning_rate": 0.1},
            r"unknown training option\(s\) \['lerning_rate'\]",
        ),
    ],
)
def test_from_dict_rejects_what_is_not_a_training_config(values, match):
    with pytest.raises(StateError, match=match):
        TrainConfig.from_dict(values)


def test_config_round_trips_through_the_checkpoint(tmp_path, data):
    cfg = config(tmp_path, data, beta=0.1, tol_adjoint=1e-3)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("dtype", "default"), [("float64", torch.float32), ("float32", torch.float64)]
)
def test_build_from_checkpoint_keeps_the_runs_dtype(tmp_path, data, dtype, default):
    """The rebuilt model has the run's dtype and bitwise its weights, whatever the default."""
    result = train(config(tmp_path, data, dtype=dtype), until=0)  # the step-0 checkpoint
    state = load_checkpoint(result.checkpoint)
    torch.set_default_dtype(default)  # the autouse fixture restores it
    rebuilt = build_from_checkpoint(state).state_dict()
    for name, tensor in state["model"].items():
        assert rebuilt[name].dtype == tensor.dtype == getattr(torch, dtype), name
        assert torch.equal(rebuilt[name], tensor), name


def test_consecutive_failed_steps_survive_a_resume(tmp_path, data, monkeypatch):
    """Steps 2-4 fail (max_skips 3): interrupted at 3 and resumed, it stops at 4 as well."""
    import gradstats.eqprop.train._loop as loop

    current = {}
    learning_rate, backprop_step = loop.learning_rate, loop._backprop_step

    def lr(cfg, step):
        current["step"] = step
        return learning_rate(cfg, step)

    def step(*args):
        record = backprop_step(*args)
        return {"skipped": True, "reason": "injected"} if current["step"] in (2, 3, 4) else record

    monkeypatch.setattr(loop, "learning_rate", lr)
    monkeypatch.setattr(loop, "_backprop_step", step)
    monkeypatch.setattr(loop, "_plot", lambda *args: None)
    kw = {"method": "backprop", "steps": 6, "max_skips": 3, "checkpoint_every": 1,
          "eval_every": 100}  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"diverged at step 4 .*3 consecutive"):
        train(config(tmp_path, data, "full", **kw))
    train(config(tmp_path, data, "parts", **kw), until=3)
    assert load_checkpoint(tmp_path / "parts")["counters"]["consecutive"] == 2
    with pytest.raises(TrainingDiverged, match=r"diverged at step 4 .*3 consecutive"):
        train(config(tmp_path, data, "parts", resume=True, **kw))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (
            {"method": "bptt", "beta": 0.1, "t2": 5, "tol": 1e-3, "anchor": "fixed"},
            r"method='bptt' does not use tol=0.001 \(only aep\|holomorphic\|ep_symmetric\|"
            r"implicit\), t2=5 .*beta=0.1 \(only aep\|holomorphic\|ep_symmetric\), "
            r"anchor='fixed' \(only aep\|holomorphic\)",
        ),
        ({"method": "bptt", "tol_adjoint": 1e-4, "points": 3}, r"tol_adjoint=0.0001.*points=3"),
        ({"method": "ep_symmetric", "anchor": "tracking"}, r"anchor='tracking' \(only aep"),
        ({"method": "ep_symmetric", "points": 6}, r"points=6 \(only holomorphic\)"),
        ({"method": "implicit", "beta": 0.1}, r"method='implicit' does not use beta=0.1"),
        ({"method": "backprop", "damping": 2.0}, r"damping=2.0 \(only aep"),
        ({"method": "aep", "layers": 2}, r"layers=2 \(only backprop\)"),
        ({"device": "gpu7"}, r"device must be a torch device .*got 'gpu7'"),
    ],
)
def test_options_the_method_does_not_use_are_rejected(tmp_path, data, kw, match):
    with pytest.raises(ConfigurationError, match=match):
        config(tmp_path, data, **kw)


def test_options_the_method_uses_are_accepted(tmp_path, data):
    config(tmp_path, data, method="holomorphic", beta=0.3, points=6, anchor="fixed")
    config(tmp_path, data, method="ep_symmetric", beta=0.1, tol_adjoint=1e-4)
    config(tmp_path, data, method="bptt", step_size=0.4, jac_penalty=0.1)
    config(tmp_path, data, method="backprop", layers=2, t1=60)  # t1: accepted by every method


def test_checkpoint_with_options_its_method_never_used_still_loads(tmp_path, data):
    """Older versions stored ignored options (e.g. a bptt run's t2): read as the defaults."""
    saved = config(tmp_path, data, method="bptt").to_dict()
    cfg = TrainConfig.from_dict({**saved, "t2": 60, "beta": 0.1})
    assert cfg == config(tmp_path, data, method="bptt")
    assert (cfg.t2, cfg.beta) == (TrainConfig().t2, None)
