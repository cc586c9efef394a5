"""scripts/gpu_check.py without a GPU: the one-line refusal, the plan, and its checks' calls
(run on the CPU, so a change of the library's API breaks this test, not the next GPU run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests._scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
CHILDREN = ROOT / "scripts" / "gpu_check_children.py"


def _load(path: Path) -> ModuleType:
    return load_script(path)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on CPU-only machines")
def test_without_cuda_it_exits_2_with_one_line(tmp_path):
    result = _run("--out", str(tmp_path / "report.json"))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("no CUDA device: ")
    assert not (tmp_path / "report.json").exists()


def test_dry_run_lists_every_part_and_runs_nothing(tmp_path):
    result = _run("--dry-run", "--out", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    for part in ("[tests]", "[sync]", "[bench]", "[nccl]"):
        assert part in result.stdout
    assert "--nproc_per_node=" in result.stdout
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("gpus", [1, 4])
def test_the_nccl_steps_use_every_gpu(tmp_path, gpus):
    steps = _load(SCRIPT).plan(tmp_path, gpus)
    nccl = [s for s in steps if s.part == "nccl"]
    assert len(nccl) == 3
    assert all(f"--nproc_per_node={gpus}" in s.command for s in nccl)


@pytest.mark.parametrize("suite", ["eqprop", "fisher", "scaling"])
def test_each_pillar_is_benchmarked(tmp_path, suite):
    steps = _load(SCRIPT).plan(tmp_path, 1)
    assert any(s.part == "bench" and suite in s.command for s in steps)


def test_the_default_budget_keeps_the_run_under_6_minutes():
    result = _run("--dry-run")
    budget = float(result.stdout.split("budget ")[1].split(" s")[0])
    assert budget <= 340  # + start-up and the report: under 360 s


@pytest.fixture(scope="module")
def sync_results(tmp_path_factory):
    """The sync checks' calls, run once on the CPU (no sync checking there)."""
    result_file = tmp_path_factory.mktemp("gpu-check") / "sync.json"
    proc = subprocess.run(
        [sys.executable, str(CHILDREN), "sync", "--device", "cpu", "--result", str(result_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result_file.exists(), proc.stdout + proc.stderr
    return {entry["check"]: entry for entry in json.loads(result_file.read_text())}


@pytest.mark.parametrize("check", sorted(_load(CHILDREN).SYNC_CHECKS))
def test_sync_check_calls_still_match_the_library(sync_results, check):
    entry = sync_results[check]
    assert entry["status"] == "passed", entry.get("error")


NCCL_CHECKS = ["DDP same_point scaler", "FisherCollector.all_reduce", "RunningMoments.all_reduce"]


@pytest.fixture(scope="module")
def nccl_results(tmp_path_factory):
    """The NCCL worker's calls, run once under torchrun on the CPU (gloo, world size 1)."""
    result_file = tmp_path_factory.mktemp("gpu-check") / "nccl.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    command += [str(CHILDREN), "nccl", "--device", "cpu", "--result", str(result_file)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result_file.exists(), proc.stdout + proc.stderr
    return {entry["check"]: entry for entry in json.loads(result_file.read_text())}


@pytest.mark.parametrize("check", NCCL_CHECKS)
def test_nccl_check_calls_still_match_the_library(nccl_results, check):
    entry = nccl_results[check]
    assert entry["status"] == "passed", entry.get("error")
    assert entry["world_size"] == 1


# --- the driver, with stand-in steps and a pretend GPU ----------------------------------------

FAKE_STEPS = {
    "passed": ["-c", "print('ok')"],
    "failed": ["-c", "import sys; print('boom'); sys.exit(3)"],
    "timeout after 1 s": ["-c", "import time; time.sleep(60)"],
}


@pytest.fixture
def fake_gpu(monkeypatch):
    module = _load(SCRIPT)
    monkeypatch.setattr(module, "MIN_STEP_S", 0.5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "pretend GPU")
    return module


@pytest.mark.parametrize("expected", sorted(FAKE_STEPS))
def test_each_step_outcome_is_reported(fake_gpu, tmp_path, monkeypatch, expected):
    step = fake_gpu.Step("s", "tests", [sys.executable, *FAKE_STEPS[expected]], timeout_s=1)
    monkeypatch.setattr(fake_gpu, "plan", lambda work, gpus: [step])
    out = tmp_path / "report.json"
    assert fake_gpu.main(["--out", str(out)]) == (0 if expected == "passed" else 1)
    report = json.loads(out.read_text())
    assert report["format"] == "gradstats-gpu-check"
    assert report["passed"] is (expected == "passed")
    assert report["environment"]["gpus"] == ["pretend GPU"]
    assert report["steps"][0]["status"] == expected


def test_a_step_past_the_budget_is_not_started(fake_gpu, tmp_path, monkeypatch):
    steps = [fake_gpu.Step(f"s{i}", "bench", [sys.executable, "-c", "pass"], 5) for i in range(2)]
    monkeypatch.setattr(fake_gpu, "plan", lambda work, gpus: steps)
    out = tmp_path / "report.json"
    assert fake_gpu.main(["--out", str(out), "--budget", "0.1"]) == 1
    statuses = [s["status"] for s in json.loads(out.read_text())["steps"]]
    assert statuses == ["not run (time budget spent)"] * 2


@pytest.mark.parametrize(
    ("out", "message"),
    [(".", "is a folder"), ("no/such/dir/report.json", "no such folder")],
)
def test_an_unusable_out_is_refused_before_anything_runs(fake_gpu, tmp_path, capsys, out, message):
    target = tmp_path / out
    assert fake_gpu.main(["--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.splitlines()) == 1
