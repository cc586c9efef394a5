"""A missing optional peer or extra skips its comparison (or suite) with a note, never crashes."""

import json
import sys

import pytest

from gradstats.bench import Skipped, find_suites, format_record, missing, run_suites
from gradstats.bench.suites import eqprop, fisher
from gradstats.errors import ConfigurationError

RUN = {"smoke": True, "warmup": 1, "repeats": 1, "progress": False}


def _hide(monkeypatch, *modules):
    """Make ``import module`` fail as if it were not installed."""
    for module in modules:
        for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, module, None)


def test_missing_names_the_module_and_its_pip_name(monkeypatch):
    _hide(monkeypatch, "transformers")
    assert missing("transformers") == "needs transformers (the `hf` extra): not installed"
    assert missing("math", "itertools") is None


def test_fisher_suite_without_transformers_runs_and_reports_the_skip(monkeypatch, tmp_path, capsys):
    _hide(monkeypatch, "transformers")
    (result,) = run_suites(["fisher"], out=tmp_path, **RUN)
    by_name = {c["comparison"]: c for c in result["comparisons"]}
    for name in fisher.LM_CASES:
        assert "transformers" in by_name[name]["skipped"]
        assert by_name[name]["candidates"] == []
    assert by_name["fisher/mlp_ef"]["candidates"]  # the MLP comparisons still ran
    saved = json.loads((tmp_path / "fisher.json").read_text())
    assert "transformers" in saved["comparisons"][-1]["skipped"]
    assert "fisher/lm_sequence  skipped: needs transformers" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("module", "candidate"),
    [("backpack", "BackPACK SumGradSquared"), ("opacus", "Opacus GradSampleModule")],
)
def test_fisher_suite_without_a_peer_leaves_that_candidate_out(monkeypatch, module, candidate):
    _hide(monkeypatch, module)
    cost = fisher.comparisons(smoke=True)[0]
    assert module in cost.unavailable[candidate]
    assert candidate not in [c.name for c in cost.candidates]


def test_eqprop_suite_without_torchdeq_leaves_its_candidates_out(monkeypatch):
    _hide(monkeypatch, "torchdeq")
    built = {c.name: c for c in eqprop.comparisons(smoke=True)}
    for name in ("eqprop/relax", "eqprop/anderson", "eqprop/implicit_gradient"):
        assert all("torchdeq" in why for why in built[name].unavailable.values())
        assert built[name].unavailable
        assert not any("torchdeq" in c.name for c in built[name].candidates)


def test_a_suite_that_imports_a_missing_module_is_skipped_whole(tmp_path, capsys):
    (tmp_path / "bench_needs_peer.py").write_text("import no_such_peer_xyz\n")
    (result,) = run_suites([], directory=tmp_path, out=None, **RUN)
    assert result["skipped"] == "needs no_such_peer_xyz: not installed"
    assert result["comparisons"] == []
    assert "suite needs_peer skipped: needs no_such_peer_xyz" in capsys.readouterr().out


def test_a_broken_gradstats_import_is_not_hidden_as_a_skip(tmp_path):
    (tmp_path / "bench_broken.py").write_text("import gradstats.no_such_module\n")
    with pytest.raises(ImportError, match=r"gradstats\.no_such_module"):
        run_suites([], directory=tmp_path, out=None, **RUN)


def test_a_skipped_comparison_formats_as_one_line():
    record = {"comparison": "x/y", "skipped": "needs z: not installed", "candidates": []}
    assert format_record(record) == "x/y  skipped: needs z: not installed"
    assert Skipped("x/y", "why") == Skipped("x/y", "why")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"names": ["no-such-suite"]}, "unknown benchmark 'no-such-suite'"),
        ({"names": [], "directory": "missing"}, "no benchmark folder at"),
    ],
    ids=["unknown-name", "missing-folder"],
)
def test_bad_suite_arguments_raise_configuration_errors(tmp_path, kwargs, match):
    if "directory" in kwargs:
        kwargs = {**kwargs, "directory": tmp_path / kwargs["directory"]}
    with pytest.raises(ConfigurationError, match=match):
        run_suites(out=None, **kwargs, **RUN)


def test_a_suite_file_without_comparisons_is_a_configuration_error(tmp_path):
    (tmp_path / "bench_empty.py").write_text("x = 1\n")
    assert list(find_suites(tmp_path)) == ["empty"]
    with pytest.raises(ConfigurationError, match="does not define comparisons"):
        run_suites([], directory=tmp_path, out=None, **RUN)


def test_a_dir_suite_that_raises_on_import_is_a_configuration_error(tmp_path):
    (tmp_path / "bench_boom.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigurationError, match=r"bench_boom.py failed to import: RuntimeError"):
        run_suites(["boom"], directory=tmp_path, out=None, **RUN)
