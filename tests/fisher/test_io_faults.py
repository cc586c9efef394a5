"""Tampered, damaged and impossible Fisher files: each is a StateError naming the problem."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gradstats.errors import GradstatsError, StateError
from gradstats.fisher import FisherCollector
from tests.fisher.models import mlp

X = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = mlp((3, 5, 4)).double()
    fc = FisherCollector(model, "empirical", "classification", element_se=True).collect(X, Y)
    return fc.save(tmp_path_factory.mktemp("fisher") / "good.safetensors")


def _read(path):
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())  # noqa: SIM118


def _rewrite(saved, tmp_path, tensors=None, metadata=None):
    data, meta = _read(saved)
    if tensors is not None:
        tensors(data)
    if metadata is not None:
        metadata(meta)
    path = tmp_path / "tampered.safetensors"
    save_file(data, str(path), metadata=meta)
    return path


def _set(key, value):
    def change(data):
        data[key] = data[key].clone()
        data[key].reshape(-1)[0] = value

    return change


def _spec(**fields):
    def change(meta):
        spec = json.loads(meta["spec"])
        for key, value in fields.items():
            if value is KeyError:
                del spec[key]
            else:
                spec[key] = value
        meta["spec"] = json.dumps(spec)

    return change


def _meta(key, value):
    def change(meta):
        if value is KeyError:
            del meta[key]
        else:
            meta[key] = value

    return change


TENSOR_CASES = {
    "nan sum": (_set("state/g2_sum/0.weight", math.nan), "holds NaN or ±inf"),
    "inf gradient sum": (_set("state/g_sum/2.bias", math.inf), "holds NaN or ±inf"),
    "negative count": (_set("state/counts/samples", -8.0), "'counts/samples' is negative"),
    "negative skipped": (_set("state/counts/skipped", -1.0), "'counts/skipped' is negative"),
    "fractional batches": (_set("state/counts/batches", 0.5), "must hold whole numbers"),
    "negative sum of squares": (_set("state/g2_sum/0.bias", -1.0), "is negative"),
    "negative m2": (_set("state/g2_m2/0.weight", -1.0), "'g2_m2/0.weight' is negative"),
    "negative trace mean": (_set("state/trace/0/mean", -1.0), "'trace/0/mean' is negative"),
    "negative mask m2": (_set("state/mask/0/m2", -2.0), "'mask/0/m2' is negative"),
    "units without batches": (_set("state/counts/batches", 0.0), "samples without any batch"),
    "wrong shape": (
        lambda d: d.__setitem__("state/g2_sum/0.weight", torch.zeros(3, 5, dtype=torch.float64)),
        r"'g2_sum/0\.weight' has shape \(3, 5\); expected \(5, 3\)",
    ),
    "missing entry": (lambda d: d.pop("state/counts/tokens"), "lacks the entry 'counts/tokens'"),
    "boolean entry": (
        lambda d: d.__setitem__("state/counts/samples", torch.tensor(True)),
        "must be a real tensor",
    ),
    "float assignment": (
        lambda d: d.__setitem__("assign/0/0", torch.zeros(5)),
        "must be a 1-d int tensor",
    ),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_impossible_statistics_are_refused(saved, tmp_path, case):
    change, match = TENSOR_CASES[case]
    path = _rewrite(saved, tmp_path, tensors=change)
    with pytest.raises(StateError, match=match):
        FisherCollector.load(path)


SPEC_CASES = {
    "bogus kind": (_spec(kind="bogus"), r"spec 'kind' must be one of 'empirical', 'mc'"),
    "bogus unit": (_spec(unit="word"), r"spec 'unit' must be one of 'sample', 'token'"),
    "ema mode": (_spec(mode="ema"), "only mode='cumulative' collectors are saved"),
    "bogus mode": (_spec(mode=3), "spec 'mode' must be one of"),
    "zero mc samples": (_spec(mc_samples=0), "spec 'mc_samples' must be >= 1"),
    "string mc samples": (_spec(mc_samples="1"), "spec 'mc_samples' must be an integer"),
    "mc samples for empirical": (_spec(mc_samples=4), "mc_samples=4 with kind='empirical'"),
    "float seed": (_spec(seed=0.5), "spec 'seed' must be an integer"),
    "beta above one": (_spec(beta=2.0), r"spec 'beta' must be a number in \(0, 1\)"),
    "string signal": (_spec(signal="yes"), "spec 'signal' must be true or false"),
    "signal with exact": (_spec(kind="exact", element_se=False), "signal=true is impossible"),
    "element_se with mc": (_spec(kind="mc"), "element_se=true is impossible with kind='mc'"),
    "bogus nonfinite": (_spec(nonfinite="ignore"), "spec 'nonfinite' must be one of"),
    "bogus likelihood": (
        _spec(likelihood_config={"likelihood": "poisson"}),
        "likelihood must be one of 'classification'",
    ),
    "likelihood config not an object": (_spec(likelihood_config=[]), "must name the likelihood"),
    "missing kind": (_spec(kind=KeyError), "the spec lacks 'kind'"),
    "missing fingerprint": (_spec(fingerprint=KeyError), "the spec lacks 'fingerprint'"),
    "wrong fingerprint": (_spec(fingerprint="0" * 16), "fingerprint does not match its params"),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_invalid_spec_fields_are_refused(saved, tmp_path, case):
    change, match = SPEC_CASES[case]
    path = _rewrite(saved, tmp_path, metadata=change)
    with pytest.raises(StateError, match=match):
        FisherCollector.load(path)


METADATA_CASES = {
    "missing spec": (_meta("spec", KeyError), "the metadata lacks 'spec'"),
    "missing params": (_meta("params", KeyError), "the metadata lacks 'params'"),
    "missing groups": (_meta("groups", KeyError), "the metadata lacks 'groups'"),
    "spec not json": (_meta("spec", "{kind: empirical"), "metadata 'spec' is not valid JSON"),
    "params not json": (_meta("params", "[["), "metadata 'params' is not valid JSON"),
    "spec a list": (_meta("spec", "[1, 2]"), "the spec must be a JSON object"),
    "params empty": (_meta("params", "{}"), "'params' must be a non-empty JSON object"),
    "params bad shape": (
        _meta("params", json.dumps({"0.weight": {"shape": "5x3", "dtype": "float64"}})),
        r"params\['0.weight'\] needs a 'shape' list",
    ),
    "params bad dtype": (
        _meta("params", json.dumps({"0.weight": {"shape": [5, 3], "dtype": "int8"}})),
        "'dtype' must be one of float16",
    ),
    "groups malformed": (_meta("groups", json.dumps({"families": 3})), "'groups' is malformed"),
    "groups a string": (_meta("groups", json.dumps("auto")), "'groups' is malformed"),
    "version from the future": (_meta("version", "99"), "has format version '99'"),
    "missing version": (_meta("version", KeyError), "has format version None"),
    "another format": (_meta("format", "gradstats.other"), "is not a gradstats Fisher file"),
}


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_bad_metadata_is_a_state_error_not_a_raw_exception(saved, tmp_path, case):
    change, match = METADATA_CASES[case]
    path = _rewrite(saved, tmp_path, metadata=change)
    with pytest.raises(StateError, match=match):
        FisherCollector.load(path)


def test_a_group_map_that_does_not_fit_the_parameters(saved, tmp_path):
    def change(meta):
        groups = json.loads(meta["groups"])
        groups["families"][0]["members"][0]["axis"] = 1
        meta["groups"] = json.dumps(groups)

    path = _rewrite(saved, tmp_path, metadata=change)
    with pytest.raises(StateError, match="the group map does not fit the parameters"):
        FisherCollector.load(path)


@pytest.mark.parametrize(
    "content", [b"", b"not a safetensors file at all", b"\xff" * 64, b"\x08" + b"\x00" * 7 + b"{}"]
)
def test_a_file_that_is_not_safetensors(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(StateError, match=r"is not a (readable safetensors|gradstats Fisher) file"):
        FisherCollector.load(path)


def test_a_tampered_file_with_a_model_leaves_no_hooks(saved, tmp_path):
    path = _rewrite(saved, tmp_path, tensors=_set("state/g2_sum/0.weight", math.nan))
    model = mlp((3, 5, 4)).double()
    with pytest.raises(StateError, match="holds NaN"):
        FisherCollector.load(path, model=model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_state_errors_are_gradstats_errors_and_value_errors(saved, tmp_path):
    path = _rewrite(saved, tmp_path, metadata=_spec(kind="bogus"))
    with pytest.raises(GradstatsError) as info:
        FisherCollector.load(path)
    assert isinstance(info.value, ValueError)


def test_a_version_1_file_with_the_old_counter_name_loads(saved, tmp_path):
    def rename(data):
        data["state/counts/rejected"] = data.pop("state/counts/skipped")
        for key in [k for k in data if k.endswith("/skipped")]:
            data[key.removesuffix("skipped") + "rejected"] = data.pop(key)

    path = _rewrite(saved, tmp_path, tensors=rename, metadata=_meta("version", "1"))
    loaded, original = FisherCollector.load(path), FisherCollector.load(saved)
    assert loaded.counts == original.counts
    for name, value in original.fisher().items():
        torch.testing.assert_close(loaded.fisher()[name], value, rtol=0, atol=0)


def test_group_counts_that_differ_between_families_are_impossible(saved, tmp_path):
    """Every family counts the same units (one combined RunningMoments holds them all)."""

    def change(data):
        key = "state/trace/2/count"
        data[key] = data[key] + 1.0
        for other in ("weight_sum", "weight_sq_sum"):
            name = f"state/trace/2/{other}"
            data[name] = data[name] + 1.0

    path = _rewrite(saved, tmp_path, tensors=change)
    with pytest.raises(StateError, match=r"trace/\*/count differs between the families"):
        FisherCollector.load(path)


def test_the_file_keeps_one_entry_set_per_family(saved):
    data, _ = _read(saved)
    for fam in ("0", "2"):
        for key in ("count", "mean", "m2", "skipped"):
            assert f"state/trace/{fam}/{key}" in data
    assert data["state/trace/0/mean"].shape == (5,)
    assert data["state/trace/2/mean"].shape == (4,)
