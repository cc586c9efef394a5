"""save() / FisherCollector.load(): safetensors with the spec in the metadata."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from gradstats.errors import ConfigurationError, StateError
from gradstats.fisher import FisherCollector
from tests.fisher.models import hf_causal_lm, mlp

X = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(1))


def _collector(model):
    return FisherCollector(model, "empirical", "classification", element_se=True)


def test_file_holds_float32_results_float64_state_and_the_spec(tmp_path):
    model = mlp((3, 5, 4)).double()
    fc = _collector(model).collect(X, Y)
    path = fc.save(tmp_path / "fisher.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("fisher/0.weight").dtype == torch.float32
        assert handle.get_tensor("state/g2_sum/0.weight").dtype == torch.float64
        assert handle.get_tensor("group/0").shape == (5,)
    spec = json.loads(meta["spec"])
    assert meta["format"] == "gradstats.fisher"
    assert meta["version"] == "2"
    assert spec["kind"] == "empirical"
    assert spec["unit"] == "sample"
    assert spec["counts"]["samples"] == 8
    assert spec["storage_dtype"] == "float32"
    assert json.loads(meta["params"])["0.weight"] == {"shape": [5, 3], "dtype": "float64"}


def test_round_trip_without_a_model_reads_merges_and_saves(tmp_path):
    model = mlp((3, 5, 4)).double()
    fc = _collector(model).collect(X[:5], Y[:5])
    loaded = FisherCollector.load(fc.save(tmp_path / "a.safetensors"))
    for name, value in fc.fisher().items():
        torch.testing.assert_close(loaded.fisher()[name], value)
        torch.testing.assert_close(loaded.standard_error()[name], fc.standard_error()[name])
    assert loaded.counts == fc.counts
    assert loaded.spec() == fc.spec()
    for fam, value in fc.group_fisher("mask").items():
        torch.testing.assert_close(loaded.group_fisher("mask")[fam], value)
    rest = _collector(model).collect(X[5:], Y[5:])
    loaded.merge(rest)
    whole = _collector(model).collect(X, Y)
    for name, value in whole.fisher().items():
        torch.testing.assert_close(loaded.fisher()[name], value)
    with pytest.raises(ConfigurationError, match=r"pass model= to FisherCollector\.load"):
        loaded.collect(X, Y)


def test_loading_with_the_model_keeps_collecting(tmp_path):
    model = hf_causal_lm("gpt2")
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(2))
    fc = FisherCollector(model, "empirical", "causal_lm").collect(ids[:2])
    resumed = FisherCollector.load(fc.save(tmp_path / "lm.safetensors"), model=model)
    resumed.collect(ids[2:])
    whole = FisherCollector(model, "empirical", "causal_lm").collect(ids)
    for name, value in whole.fisher().items():
        torch.testing.assert_close(resumed.fisher()[name], value)
    for fam, value in whole.group_fisher("mask").items():
        torch.testing.assert_close(resumed.group_fisher("mask")[fam], value)


@pytest.mark.parametrize("sizes", [(3, 5), (3, 6, 4), (4, 5, 4)])
def test_load_on_a_different_model_says_so_and_leaves_no_hooks(tmp_path, sizes):
    fc = _collector(mlp((3, 5, 4)).double()).collect(X, Y)
    path = fc.save(tmp_path / "a.safetensors")
    other = mlp(sizes).double()
    with pytest.raises(StateError, match="was collected on a different model"):
        FisherCollector.load(path, model=other)
    assert sum(len(m._forward_hooks) for m in other.modules()) == 0


def test_load_of_a_missing_file():
    with pytest.raises(FileNotFoundError, match="no Fisher file"):
        FisherCollector.load("/nonexistent/missing.safetensors")


def test_load_of_another_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "x"})
    with pytest.raises(StateError, match="is not a gradstats Fisher file"):
        FisherCollector.load(tmp_path / "other.safetensors")


def test_an_empty_collector_saves_and_loads(tmp_path):
    fc = _collector(mlp((3, 5, 4)).double())
    loaded = FisherCollector.load(fc.save(tmp_path / "empty.safetensors"))
    assert loaded.counts == fc.counts
    assert loaded.counts["batches"] == 0


def test_callable_likelihood_must_be_passed_again(tmp_path):
    def loss(out, y):
        return torch.nn.functional.cross_entropy(out, y, reduction="none")

    model = mlp((3, 5, 4)).double()
    path = FisherCollector(model, "empirical", loss).collect(X, Y).save(tmp_path / "c.safetensors")
    with pytest.raises(ConfigurationError, match="pass likelihood= to load"):
        FisherCollector.load(path, model=model)
    resumed = FisherCollector.load(path, model=model, likelihood=loss)
    assert resumed.collect(X, Y).counts["samples"] == 16
