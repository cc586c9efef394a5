"""Every benchmark suite runs at smoke size and its candidates agree, so none goes stale."""

import json
from pathlib import Path

import pytest

from gradstats.bench import find_suites, run_suites

SUITES = sorted(find_suites())
CHECKOUT_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_suites_ship_in_the_package():
    assert SUITES == ["eqprop", "eqprop_transformer", "fisher", "moments", "scaling"]
    assert find_suites()["moments"] == "gradstats.bench.suites.moments"


def test_the_checkout_folder_re_exports_the_same_suites():
    found = find_suites(CHECKOUT_BENCHMARKS)
    assert sorted(found) == SUITES


@pytest.mark.parametrize("suite", SUITES)
def test_suite_smoke_run(suite, tmp_path):
    (result,) = run_suites([suite], out=tmp_path, smoke=True, warmup=1, repeats=2, progress=False)
    record = json.loads((tmp_path / f"{suite}.json").read_text())
    assert record["environment"]["torch"]
    assert "skipped" not in result
    for comparison in result["comparisons"]:
        for row in comparison["candidates"]:
            assert row["median_s"] > 0
            assert row.get("agrees", True), f"{comparison['comparison']}: {row['name']} disagrees"
