"""Every benchmark suite runs at smoke size and its candidates agree, so none goes stale."""

import json

import pytest

from gradstats.bench import default_directory, find_suites, run_suites

SUITES = sorted(find_suites(default_directory()))


def test_suites_are_found():
    assert "moments" in SUITES


@pytest.mark.parametrize("suite", SUITES)
def test_suite_smoke_run(suite, tmp_path):
    (result,) = run_suites(
        [suite],
        directory=default_directory(),
        out=tmp_path,
        smoke=True,
        warmup=1,
        repeats=2,
        progress=False,
    )
    record = json.loads((tmp_path / f"{suite}.json").read_text())
    assert record["environment"]["torch"]
    for comparison in result["comparisons"]:
        for row in comparison["candidates"]:
            assert row["median_s"] > 0
            assert row.get("agrees", True), f"{comparison['comparison']}: {row['name']} disagrees"
