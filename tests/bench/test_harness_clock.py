"""The harness's clock: CPU time of the calling thread on the CPU (one thread), recorded."""

import time

import torch

from gradstats.bench import Candidate, Comparison, run_comparison
from gradstats.bench._harness import clock_name


def test_cpu_comparisons_use_thread_cpu_time_and_record_it():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        comparison = Comparison(
            name="t/sleep_is_free",
            candidates=[
                Candidate("sleep", lambda: time.sleep(0.02) or 0.0),
                Candidate(
                    "work", lambda: float(torch.randn(300, 300).matmul(torch.ones(300)).sum())
                ),
            ],
            baseline="work",
            check=False,
        )
        record = run_comparison(comparison, warmup=1, repeats=3, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert record["clock"] == "thread_time"
    rows = {row["name"]: row for row in record["candidates"]}
    assert rows["sleep"]["median_s"] < 0.01  # a sleep costs (almost) no CPU time


def test_accelerators_use_the_wall_clock():
    assert clock_name(torch.device("cuda")) == "perf_counter"
    assert clock_name(torch.device("meta")) == "perf_counter"
