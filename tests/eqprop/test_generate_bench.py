"""The eqprop_transformer bench suite: denormals flushed while timing, the setting restored."""

import pytest
import torch

from gradstats.bench.suites.eqprop_transformer import (
    _generation,
    flush_denormals,
    flushes_denormals,
)

SUPPORTED = torch.set_flush_denormal(False)  # False where the CPU cannot flush (then: no-op)


@pytest.mark.skipif(not SUPPORTED, reason="this CPU cannot flush denormals")
@pytest.mark.parametrize("before", [False, True])
def test_flush_denormals_flushes_inside_and_restores_after(before):
    torch.set_flush_denormal(before)
    try:
        assert flushes_denormals() is before
        with flush_denormals():
            assert flushes_denormals()
            assert torch.tensor([1e-40], dtype=torch.float32).mul(1.0)[0] == 0
        assert flushes_denormals() is before
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.skipif(not SUPPORTED, reason="this CPU cannot flush denormals")
def test_the_setting_is_restored_when_the_timed_call_raises():
    with pytest.raises(RuntimeError, match="boom"), flush_denormals():
        raise RuntimeError("boom")
    assert not flushes_denormals()


def test_every_candidate_is_timed_with_denormals_flushed(monkeypatch):
    seen = []
    comparison = _generation(smoke=True)
    import gradstats.bench.suites.eqprop_transformer as suite

    real = suite.relax

    def recording(*args, **kwargs):
        seen.append(flushes_denormals())
        return real(*args, **kwargs)

    monkeypatch.setattr(suite, "relax", recording)
    baseline = next(c for c in comparison.candidates if c.name == "re-relax")
    baseline.fn()
    assert seen
    assert all(seen) == SUPPORTED
    assert not flushes_denormals()


def test_the_generation_candidates_pick_the_same_tokens():
    comparison = _generation(smoke=True)
    outputs = [c.fn() for c in comparison.candidates]
    assert torch.equal(outputs[0], outputs[1])
    assert outputs[0].shape == (comparison.params["tokens"] + 1,)
