"""The steady CPU heap of ``gradstats bench``: no page faults once warm, recorded, bad input."""

import json
import platform
import subprocess
import sys

import pytest

from gradstats.bench import run_suites
from gradstats.bench._allocator import allocator_mode
from gradstats.cli import main
from gradstats.errors import ConfigurationError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# one fresh process per mode (the setting lasts for the process): a 64 MiB tensor allocated,
# written and freed ten times (glibc serves it by mmap and gives it back: its pages fault
# again at every call), the minor page faults of the last five calls, and the recorded mode
PROBE = """
import json, resource, sys, torch
from gradstats.bench._allocator import allocator_mode, steady_allocator
if sys.argv[1] == "steady":
    steady_allocator()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": sum(faults[5:]), "mode": allocator_mode()["mode"]}))
"""


def _probe(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the steady heap is a glibc setting")
def test_a_steady_heap_reuses_its_pages_where_the_stock_one_faults_them_in_again():
    stock, steady = _probe("stock"), _probe("steady")
    assert stock["mode"] == "stock"
    assert steady["mode"] == "steady"
    assert stock["faults"] > 5 * 4096  # ≥ 16 MiB of fresh pages per call (64 MiB written)
    assert steady["faults"] < 100  # warm: the same pages every call


def test_the_default_mode_of_a_library_process_is_stock_and_recorded():
    assert allocator_mode()["mode"] == "stock"  # run_suites' default leaves the heap alone
    from gradstats.bench import environment

    assert environment()["cpu_allocator"]["mode"] == "stock"


def test_an_unknown_allocator_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigurationError, match="allocator must be one of 'steady', 'stock'"):
        run_suites([], out=tmp_path, smoke=True, warmup=0, repeats=1, allocator="jemalloc")
    assert not any(tmp_path.iterdir())


def test_the_cli_refuses_an_unknown_allocator_with_its_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--allocator", "jemalloc"])
    assert exit_info.value.code == 2
    assert "'steady', 'stock'" in capsys.readouterr().err


@pytest.mark.skipif(not GLIBC, reason="page faults are counted on Linux")
def test_the_harness_records_the_page_faults_of_each_timed_call():
    from gradstats.bench import Candidate, Comparison, format_record, run_comparison

    comparison = Comparison(
        name="t/faults",
        candidates=[
            Candidate("fresh pages", lambda: bytearray(8 * 2**20)),  # mmap'd, zero-filled, freed
            Candidate("none", lambda: None),
        ],
        baseline="none",
        check=False,
    )
    record = run_comparison(comparison, warmup=1, repeats=3, progress=False)
    rows = {row["name"]: row for row in record["candidates"]}
    assert rows["none"]["minor_faults_per_call"] == 0
    assert rows["fresh pages"]["minor_faults_per_call"] >= 1024  # ≥ 4 MiB of 4 KiB pages
    assert "faults" in format_record(record)
