"""The batch-size experiment in examples/ still runs (smoke size), so it cannot go stale."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "scaler_batch_size.py"


def test_experiment_smoke_run(tmp_path):
    spec = importlib.util.spec_from_file_location("scaler_batch_size", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        module.main(["--smoke", "--lrs", "0.05", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "results.json").read_text())
    assert len(record["runs"]) == 4 * 3
    assert (tmp_path / "scaler_batch_size.png").stat().st_size > 10_000
