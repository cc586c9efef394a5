"""Parameter EMA (``--ema-decay``): the average itself (float64), where it is used, its state."""

import pytest
import torch

from gradstats.data import load_corpus
from gradstats.eqprop.train import (
    TrainConfig,
    build_from_checkpoint,
    evaluate,
    load_checkpoint,
    read_metrics,
    train,
)
from gradstats.eqprop.train._checkpoint import save_checkpoint
from gradstats.eqprop.train._ema import ParameterEMA
from gradstats.errors import StateError

pytestmark = pytest.mark.usefixtures("no_plot")  # curves.png: slow, not tested here


def _cfg(tmp_path, data, name="run", **kw):
    base = {"method": "aep", "steps": 4, "out": tmp_path / name, "data": data, "d_model": 16,
            "n_heads": 2, "block_size": 12, "batch_size": 3, "t1": 30, "t2": 60,
            "eval_every": 2, "eval_batches": 1, "spot_check_every": 0, "checkpoint_every": 2,
            "progress": False, "init_std": 0.1, "ema_decay": 0.8}  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _recording(monkeypatch):
    """Record the trainable parameters every EMA update sees (the trajectory θ_1..θ_n)."""
    seen: list[dict[str, torch.Tensor]] = []
    original = ParameterEMA.update

    def update(self, model):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return original(self, model)

    monkeypatch.setattr(ParameterEMA, "update", update)
    return seen


@pytest.mark.parametrize("decay", [0.8, 0.0])
def test_ema_equals_the_debiased_average_of_the_trajectory(tmp_path, data, monkeypatch, decay):
    seen = _recording(monkeypatch)
    result = train(_cfg(tmp_path, data, dtype="float64", ema_decay=decay))
    state = load_checkpoint(result.checkpoint)
    assert len(seen) == state["ema"]["count"] == 4
    for name, tensor in state["model"].items():
        if name in seen[-1]:
            assert torch.equal(seen[-1][name], tensor), name  # the trajectory ends at θ_n
    model = build_from_checkpoint(state)  # θ_ema by default
    n = len(seen)
    for name, param in model.named_parameters():
        weights = [(1 - decay) * decay ** (n - k) / (1 - decay**n) for k in range(1, n + 1)]
        expected = sum(w * s[name] for w, s in zip(weights, seen, strict=True))
        torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-14)  # float64
    raw = build_from_checkpoint(state, weights="raw")
    for name, param in raw.named_parameters():
        assert torch.equal(param.detach(), state["model"][name])


def test_validation_uses_the_ema_weights(tmp_path, data):
    cfg = _cfg(tmp_path, data)
    result = train(cfg)
    last = read_metrics(result.metrics)[-1]
    state = load_checkpoint(result.checkpoint)
    corpus = load_corpus(data)
    ema_ce = evaluate(build_from_checkpoint(state), cfg, corpus)
    raw_ce = evaluate(build_from_checkpoint(state, weights="raw"), cfg, corpus)
    assert last["val_ce"] == ema_ce
    assert last["val_ce_raw"] == raw_ce
    assert ema_ce != raw_ce


def test_sampling_probe_and_fisher_load_the_ema_weights(tmp_path, data):
    from gradstats.cli._eqprop_sample import _load

    result = train(_cfg(tmp_path, data, steps=2))
    state = load_checkpoint(result.checkpoint)
    _, _, model, _ = _load(result.checkpoint)
    expected = build_from_checkpoint(state)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert not torch.equal(model.state_dict()["embed.token"], state["model"]["embed.token"])


def test_no_ema_means_the_trained_weights(tmp_path, data):
    result = train(_cfg(tmp_path, data, steps=2, ema_decay=None))
    state = load_checkpoint(result.checkpoint)
    assert "ema" not in state
    assert "val_ce_raw" not in read_metrics(result.metrics)[-1]
    for name, param in build_from_checkpoint(state).named_parameters():
        assert torch.equal(param.detach(), state["model"][name])


def test_a_tampered_ema_state_is_refused(tmp_path, data):
    result = train(_cfg(tmp_path, data, steps=2))
    state = load_checkpoint(result.checkpoint)
    state["ema"]["params"] = {}
    save_checkpoint(result.checkpoint, {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(StateError, match="EMA weights do not fit"):
        train(_cfg(tmp_path, data, steps=4, resume=True))
    with pytest.raises(StateError, match="EMA weights do not fit"):
        build_from_checkpoint(state)
