"""The SB3 PPO experiment in examples/ still runs (smoke size), so it cannot go stale."""

import json
from pathlib import Path

import pytest
import torch

from tests._scripts import load_script

pytest.importorskip("stable_baselines3")
pytest.importorskip("gymnasium")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "scaler_ppo.py"


def test_ppo_experiment_smoke_run(tmp_path, monkeypatch):
    module = load_script(SCRIPT)
    threads = torch.get_num_threads()
    argv = ["--smoke", "--envs", "CartPole-v1", "--seeds", "0", "--out", str(tmp_path)]
    torch.set_default_dtype(torch.float32)  # SB3 is float32 (the conftest restores float64)
    try:
        module.main([*argv, "--variants", "plain,per_sample_shrink"])
        files = sorted((tmp_path / "runs").glob("*.json"))
        stamps = [p.stat().st_mtime_ns for p in files]
        # resumable: a second call skips the finished runs and rebuilds the summary
        module.main([*argv, "--variants", "plain,per_sample_shrink"])
    finally:
        torch.set_num_threads(threads)
    assert [p.name for p in files] == [
        "CartPole-v1__per_sample_shrink__0.json",
        "CartPole-v1__plain__0.json",
    ]
    assert [p.stat().st_mtime_ns for p in files] == stamps
    record = json.loads((tmp_path / "results.json").read_text())
    rows = {r["variant"]: r for r in record["summary"]}
    assert list(rows) == ["plain", "per_sample_shrink"]
    for row in rows.values():
        assert row["env"] == "CartPole-v1"
        assert row["n"] == 1
        assert row["seeds"] == [0]
        assert row["eval_return_std"] == 0.0
        assert 1.0 <= row["eval_return_mean"] <= 500.0
        assert 0.0 < row["mean_factor"] <= 1.0
    assert rows["plain"]["mean_factor"] == 1.0
    assert {r["variant"] for r in record["runs"]} == set(rows)
    assert all(r["eval_episodes"] == 2 for r in record["runs"])
    assert (tmp_path / "scaler_ppo.png").stat().st_size > 10_000


def test_ppo_experiment_rejects_unknown_variant(tmp_path, monkeypatch):
    module = load_script(SCRIPT)
    with pytest.raises(SystemExit):
        module.main(["--smoke", "--variants", "adascale", "--out", str(tmp_path)])
