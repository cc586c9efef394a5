"""examples/distributed_cost.py at smoke size: the bytes each pillar sends follow its formula."""

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_cost.py"


def test_distributed_cost_smoke(tmp_path):
    out = tmp_path / "cost.json"
    command = [sys.executable, str(EXAMPLE), "--smoke", "--json", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    results = json.loads(out.read_text())
    scaler1, scaler2 = results["scaler/1"], results["scaler/2"]
    # DDP sends the float32 gradients; the same-point scaler one float64 pair per tensor.
    assert scaler2["bytes"]["DDP gradients"] == 4 * scaler2["params"]
    assert scaler2["bytes"]["all_reduce"] == 16 * scaler2["tensors"]
    assert "all_reduce" not in scaler1["bytes"]  # one rank: nothing of the scaler's own
    assert results["fisher/1"]["bytes"] == {}
    assert results["fisher/2"]["samples"] == results["fisher/1"]["samples"] * 2
    assert results["fisher/2"]["bytes"]["all_reduce"] >= 16 * results["fisher/2"]["params"]
    eqprop = results["eqprop/2"]
    assert 4 * eqprop["params"] <= eqprop["bytes"]["all_reduce"] < 4 * eqprop["params"] + 512
