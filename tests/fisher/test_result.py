"""FisherSpec, FisherResult, load and resume: one spec, one estimand per kind, one result."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError, StateError
from gradstats.fisher import (
    FisherCollector,
    FisherResult,
    FisherSpec,
    importance_ranking,
    load,
    resume,
    task_overlap,
)
from gradstats.fisher._estimands import ESTIMANDS, KINDS, estimand
from tests.fisher.models import hf_causal_lm, mlp

X = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(1))
MODEL = mlp((3, 5, 4)).double()

SPECS = {
    "empirical": FisherSpec("empirical", element_se=True),
    "exact": FisherSpec("exact"),
    "batch_grad_sq": FisherSpec("batch_grad_sq"),
}


def _assert_identical(a: FisherResult, b: FisherResult) -> None:
    """Every float64 statistic to 1e-12 (relative), and the spec: the sums are exact; the group
    moments of several batches may be folded in together (Chan), which rounds differently from
    one batch at a time."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["spec"] == sb["spec"]
    assert sa["tensors"].keys() == sb["tensors"].keys()
    for key, value in sa["tensors"].items():
        assert value.dtype in (torch.float64, torch.int64), key
        torch.testing.assert_close(value, sb["tensors"][key], rtol=1e-12, atol=0, msg=key)


@pytest.mark.parametrize("kind", list(SPECS))
def test_save_load_resume_equals_one_uninterrupted_collection(tmp_path, kind):
    spec = SPECS[kind]
    whole = FisherCollector(MODEL, spec=spec).collect(X[:4], Y[:4]).collect(X[4:], Y[4:])
    first = FisherCollector(MODEL, spec=spec).collect(X[:4], Y[:4])
    first.close()
    result = load(first.save(tmp_path / "part.safetensors"))
    assert isinstance(result, FisherResult)
    resumed = resume(result, MODEL).collect(X[4:], Y[4:])
    _assert_identical(resumed.result, whole.result)
    for name, value in whole.fisher().items():
        torch.testing.assert_close(resumed.fisher()[name], value, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seeded", [False, True], ids=["default generator", "generator="])
def test_mc_resumes_exactly_from_the_generator_state_in_the_file(tmp_path, seeded):
    """No generator passed to resume: the file's saved state continues the label draws."""
    spec = FisherSpec("mc", mc_samples=3, seed=5)
    make = (lambda: {"generator": torch.Generator().manual_seed(7)}) if seeded else dict
    whole = FisherCollector(MODEL, spec=spec, **make()).collect(X[:4]).collect(X[4:])
    first = FisherCollector(MODEL, spec=spec, **make()).collect(X[:4])
    path = first.save(tmp_path / "mc.safetensors")
    first.close()
    result = load(path)
    assert result.generator_state is not None
    resumed = resume(result, MODEL).collect(X[4:])
    _assert_identical(resumed.result, whole.result)
    again = resume(load(resumed.save(tmp_path / "again.safetensors")), MODEL)
    resumed.close()
    assert torch.equal(again.result.generator_state, resumed.result.generator_state)


def test_a_tampered_generator_state_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    fc = FisherCollector(MODEL, spec=FisherSpec("mc")).collect(X[:4])
    path = fc.save(tmp_path / "mc.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors["rng/generator"] = tensors["rng/generator"].float()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(StateError, match="rng/generator must be a 1-D uint8"):
        load(path)


def test_mc_resumes_exactly_with_the_generator_continued(tmp_path):
    # the generator passed to resume wins over the file's state
    def generator():
        return torch.Generator().manual_seed(7)

    spec = FisherSpec("mc", mc_samples=3)
    whole = FisherCollector(MODEL, spec=spec, generator=generator())
    whole.collect(X[:4]).collect(X[4:])
    draws = generator()
    first = FisherCollector(MODEL, spec=spec, generator=draws).collect(X[:4])
    result = load(first.save(tmp_path / "mc.safetensors"))
    first.close()
    resumed = resume(result, MODEL, generator=draws).collect(X[4:])
    _assert_identical(resumed.result, whole.result)


def test_token_units_resume_exactly(tmp_path):
    model = hf_causal_lm("gpt2")
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(2))
    spec = FisherSpec("empirical", "causal_lm", "token")
    whole = FisherCollector(model, spec=spec).collect(ids[:2]).collect(ids[2:])
    whole.close()
    first = FisherCollector(model, spec=spec).collect(ids[:2])
    first.close()
    resumed = resume(load(first.save(tmp_path / "lm.safetensors")), model).collect(ids[2:])
    _assert_identical(resumed.result, whole.result)


def test_result_reads_equal_the_collectors_and_survive_a_file(tmp_path):
    fc = FisherCollector(MODEL, element_se=True).collect(X, Y)
    loaded = load(fc.save(tmp_path / "r.safetensors"))
    for result in (fc.result, loaded):
        assert result.counts == fc.counts
        assert result.spec() == fc.spec()
        assert result.config == fc.config
        for read in ("fisher", "mean_gradient", "signal", "variance", "standard_error"):
            for name, value in getattr(fc, read)().items():
                torch.testing.assert_close(getattr(result, read)()[name], value, rtol=0, atol=0)
        for kind in ("trace", "mask"):
            for fam, value in fc.group_fisher(kind).items():
                torch.testing.assert_close(result.group_fisher(kind)[fam], value, rtol=0, atol=0)
            for fam, value in fc.group_standard_error(kind).items():
                torch.testing.assert_close(result.group_standard_error(kind)[fam], value)
        assert result.group_names() == fc.group_names()
        assert importance_ranking(result) == importance_ranking(fc)
    assert task_overlap(fc, loaded)["overlap"] == pytest.approx(1.0)


def test_resume_copies_the_result_and_merge_takes_results(tmp_path):
    fc = FisherCollector(MODEL).collect(X[:4], Y[:4])
    result = load(fc.save(tmp_path / "a.safetensors"))
    before = result.counts
    resume(result, MODEL).collect(X[4:], Y[4:]).close()
    assert result.counts == before  # the result itself is not changed
    merged = FisherCollector(MODEL).collect(X[4:], Y[4:]).merge(result)
    whole = FisherCollector(MODEL).collect(X, Y)
    for name, value in whole.fisher().items():
        torch.testing.assert_close(merged.fisher()[name], value)
    assert result.empty_like().counts["batches"] == 0


@pytest.mark.parametrize("sizes", [(3, 5), (3, 6, 4)])
def test_resume_on_a_different_model_says_so_and_leaves_no_hooks(tmp_path, sizes):
    result = FisherCollector(MODEL).collect(X, Y).result
    other = mlp(sizes).double()
    with pytest.raises(StateError, match="collected on a different model"):
        resume(result, other)
    assert sum(len(m._forward_hooks) for m in other.modules()) == 0
    with pytest.raises(ConfigurationTypeError, match="result must be a FisherResult"):
        resume("fisher.safetensors", MODEL)


def test_a_callable_likelihood_is_passed_again_to_resume(tmp_path):
    def loss(out, y):
        return torch.nn.functional.cross_entropy(out, y, reduction="none")

    fc = FisherCollector(MODEL, "empirical", loss).collect(X, Y)
    result = load(fc.save(tmp_path / "c.safetensors"))
    assert result.config.recorded_callable
    assert result.spec()["likelihood"] == "callable:loss"
    with pytest.raises(ConfigurationError, match="pass likelihood= to load"):
        resume(result, MODEL)
    assert resume(result, MODEL, likelihood=loss).collect(X, Y).counts["samples"] == 20
    again = load(tmp_path / "c.safetensors", likelihood=loss)
    assert again.config.likelihood is loss


def test_collector_options_and_spec_are_one_thing():
    spec = FisherSpec("mc", mc_samples=2, seed=3, beta=0.5)
    fc = FisherCollector(MODEL, spec=spec)
    assert fc.config is spec
    assert (fc.kind, fc.mc_samples, fc.seed, fc.beta) == ("mc", 2, 3, 0.5)
    assert FisherCollector(MODEL, "mc", mc_samples=2, seed=3, beta=0.5).config == spec
    assert FisherCollector(MODEL).config == FisherSpec()  # the defaults are the dataclass's
    with pytest.raises(ConfigurationError, match="pass spec= or the options it holds, not both"):
        FisherCollector(MODEL, spec=spec, kind="mc")
    with pytest.raises(ConfigurationError, match="not both; got spec= and seed"):
        FisherCollector(MODEL, spec=spec, seed=0)  # even at the default value
    with pytest.raises(ConfigurationTypeError, match="spec must be a FisherSpec"):
        FisherCollector(MODEL, spec={"kind": "mc"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.kind = "exact"  # type: ignore[misc]


SPEC_ERRORS = {
    "bogus kind": ({"kind": "fisher"}, ConfigurationError, "kind must be one of 'empirical'"),
    "bogus unit": ({"unit": "word"}, ConfigurationError, "unit must be one of 'sample'"),
    "token without tokens": ({"unit": "token"}, ConfigurationError, "needs a likelihood with"),
    "mc samples without mc": ({"mc_samples": 3}, ConfigurationError, "kind='mc' only"),
    "float seed": ({"seed": 1.5}, ConfigurationTypeError, "seed must be an int"),
    "beta one": ({"beta": 1.0}, ConfigurationError, "beta must lie in the open interval"),
    "element_se with mc": (
        {"kind": "mc", "element_se": True},
        ConfigurationError,
        "element_se=True needs kind='empirical'",
    ),
    "batch_grad_sq in ema": (
        {"kind": "batch_grad_sq", "mode": "ema"},
        ConfigurationError,
        "supports mode='cumulative' only",
    ),
    "mc with a callable": (
        {"kind": "mc", "likelihood": lambda out, y: out.sum(-1)},
        ConfigurationError,
        "kind='mc' is not available for likelihood",
    ),
    "bogus nonfinite": ({"nonfinite": "ignore"}, ConfigurationError, "nonfinite must be one of"),
    "zero chunk_bytes": ({"chunk_bytes": 0}, ConfigurationError, "chunk_bytes must be an int"),
}


@pytest.mark.parametrize("case", list(SPEC_ERRORS))
def test_spec_validation_names_the_argument(case):
    kwargs, error, match = SPEC_ERRORS[case]
    with pytest.raises(error, match=match):
        FisherSpec(**kwargs)


def test_saved_spec_validation_raises_state_errors():
    good = FisherCollector(MODEL).spec()
    assert FisherSpec.from_saved(good, "f") == FisherSpec()
    with pytest.raises(StateError, match="f: spec 'kind' must be one of"):
        FisherSpec.from_saved(good | {"kind": "bogus"}, "f")
    with pytest.raises(StateError, match="f: the spec lacks 'unit'"):
        FisherSpec.from_saved({k: v for k, v in good.items() if k != "unit"}, "f")


def test_one_estimand_per_kind_declares_what_it_needs():
    assert tuple(ESTIMANDS) == KINDS
    assert [k for k in KINDS if estimand(k).needs_targets] == ["empirical", "batch_grad_sq"]
    assert [k for k in KINDS if estimand(k).has_signal] == ["empirical", "mc"]
    assert [k for k in KINDS if not estimand(k).is_fisher] == ["batch_grad_sq"]
    assert FisherSpec("exact").signal is False  # normalised to what is collected
    assert FisherCollector(MODEL, "exact").spec()["estimand"] == ESTIMANDS["exact"]


def test_a_generator_state_of_another_device_kind_is_a_clear_error():
    result = FisherCollector(MODEL, spec=FisherSpec("mc")).collect(X[:4]).result
    result.generator_state = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's size
    with pytest.raises(StateError, match="pass generator= to resume"):
        resume(result, MODEL).collect(X[4:])
