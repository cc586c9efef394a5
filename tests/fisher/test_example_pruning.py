"""The pruning experiment in examples/ still runs (smoke size, under a minute), so it cannot go
stale: every ranking × structure × fraction is evaluated before and after the rescaling."""

import json
import time
from pathlib import Path

import torch

from tests._scripts import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "fisher_pruning.py"


def test_pruning_experiment_smoke_run(tmp_path):
    module = load_script(SCRIPT)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        result = module.main(["--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert time.perf_counter() - start < 60
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["summary"] == json.loads(json.dumps(result["summary"]))
    keys = [
        f"{s}/{m}/{f}" for s in ("heads", "neurons") for m in module.METHODS for f in (0.25, 0.5)
    ]
    assert sorted(record["seeds"][0]["results"]) == sorted(keys)
    for seed in record["seeds"]:
        assert seed["exact"]["passes_per_batch"] == 7 * record["vocab_size"]
        for key, value in seed["results"].items():
            removed = sum(len(v) for v in value["removed"].values())
            total = 2 * (4 if key.startswith("heads") else 128)  # 2 layers, smoke sizes
            assert removed == round(float(key.rsplit("/", 1)[1]) * total)
            assert 0 < value["pruned"] < 10
            assert 0 < value["rescaled"] < 10
    assert (tmp_path / "fisher_pruning.png").stat().st_size > 10_000
