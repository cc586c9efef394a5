import math

import pytest
import torch

from gradstats.bench import (
    Candidate,
    Comparison,
    format_record,
    peak_memory_bytes,
    run_comparison,
)
from gradstats.errors import ConfigurationError, ConfigurationTypeError


def _slow(seconds):
    """Busy work of ``seconds`` CPU seconds (the CPU clock does not count a sleep)."""

    def fn():
        import time

        start = time.thread_time()
        while time.thread_time() - start < seconds:
            pass
        return torch.tensor(0.0)

    return fn


def test_ratios_and_medians_follow_the_timings():
    comparison = Comparison(
        name="t/busy",
        candidates=[Candidate("fast", _slow(0.002)), Candidate("slow", _slow(0.006))],
        baseline="fast",
    )
    record = run_comparison(comparison, warmup=1, repeats=5, progress=False)
    rows = {row["name"]: row for row in record["candidates"]}
    assert rows["fast"]["ratio_to_baseline"] == 1.0
    assert 2.0 < rows["slow"]["ratio_to_baseline"] < 4.5
    assert len(rows["slow"]["times_s"]) == 5
    assert all(row["agrees"] for row in rows.values())


def test_agreement_check_catches_different_numbers():
    comparison = Comparison(
        name="t/numbers",
        candidates=[
            Candidate("a", lambda: {"x": torch.ones(3)}),
            Candidate("b", lambda: {"x": torch.ones(3) + 1e-3}),
            Candidate("c", lambda: {"x": torch.ones(4)}),
        ],
        baseline="a",
        rtol=1e-6,
    )
    record = run_comparison(comparison, warmup=1, repeats=2, progress=False)
    agrees = {row["name"]: row["agrees"] for row in record["candidates"]}
    assert agrees == {"a": True, "b": False, "c": False}
    b = next(row for row in record["candidates"] if row["name"] == "b")
    assert math.isclose(b["max_abs_diff"], 1e-3, rel_tol=1e-3)
    assert "NO" in format_record(record)


def test_memory_is_measured_on_cpu():
    comparison = Comparison(
        name="t/memory",
        candidates=[Candidate("alloc", lambda: torch.ones(1024, 1024).sum())],
        baseline="alloc",
        memory=True,
    )
    record = run_comparison(comparison, warmup=1, repeats=1, progress=False)
    assert record["candidates"][0]["peak_bytes"] >= 4 * 1024 * 1024


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"baseline": "missing"}, "baseline must be one of"),
        ({"baseline": "a", "reference": "zzz"}, "reference must be one of"),
    ],
)
def test_comparison_validates_names(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        Comparison(name="t", candidates=[Candidate("a", lambda: 0.0)], **kwargs)


def test_candidate_names_must_be_unique():
    with pytest.raises(ConfigurationError, match="unique"):
        Comparison(name="t", candidates=[Candidate("a", lambda: 0.0)] * 2, baseline="a")


def test_an_output_that_is_not_numbers_is_a_type_error():
    comparison = Comparison(name="t", candidates=[Candidate("a", lambda: "text")], baseline="a")
    with pytest.raises(ConfigurationTypeError, match="benchmark outputs must be tensors"):
        run_comparison(comparison, warmup=1, repeats=1, progress=False)


def test_memory_on_an_unsupported_device_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="cpu or cuda device"):
        peak_memory_bytes(lambda: None, "meta")


def test_settle_runs_each_timed_call_after_untimed_calls_of_itself():
    order: list[str] = []

    def call(name):
        return lambda: order.append(name)

    comparison = Comparison(
        name="t/settle",
        candidates=[Candidate("a", call("a")), Candidate("b", call("b"))],
        baseline="a",
        check=False,
        settle=2,
    )
    record = run_comparison(comparison, warmup=1, repeats=2, progress=False)
    assert record["settle"] == 2
    timed = order[2:]  # after one warm-up call each
    assert timed == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3  # rotation kept


@pytest.mark.parametrize("settle", [-1, 1.5, True])
def test_bad_settle_is_refused(settle):
    with pytest.raises(ConfigurationError, match="settle must be an int >= 0"):
        Comparison(name="t/x", candidates=[Candidate("a", lambda: 0)], baseline="a", settle=settle)


def test_paired_ratio_is_the_median_of_per_repeat_ratios():
    from gradstats.bench import paired_ratio

    ratio, (low, high) = paired_ratio([2.0, 4.0, 9.0, 1.0], [1.0, 2.0, 3.0, 1.0])
    assert ratio == 2.0  # ratios 2, 2, 3, 1
    assert low <= 2.0 <= high
    # a drift that scales both calls of a repeat alike leaves the paired ratio exact
    slow = [1.0, 10.0, 1.0, 10.0, 1.0]
    ratio, _ = paired_ratio([1.1 * t for t in slow], slow)
    assert abs(ratio - 1.1) < 1e-12


def test_pairs_are_reported_and_checked():
    comparison = Comparison(
        name="t/pairs",
        candidates=[Candidate("a", _slow(0.002)), Candidate("b", _slow(0.004))],
        baseline="a",
        check=False,
        pairs=[("b", "a")],
    )
    record = run_comparison(comparison, warmup=1, repeats=3, progress=False)
    (pair,) = record["pairs"]
    assert pair["numerator"] == "b"
    assert 1.5 < pair["paired_ratio"] < 3.0
    assert "b ÷ a" in format_record(record)
    with pytest.raises(ConfigurationError, match="pairs must be"):
        Comparison(
            name="t/x", candidates=[Candidate("a", lambda: 0)], baseline="a", pairs=[("a", "z")]
        )
