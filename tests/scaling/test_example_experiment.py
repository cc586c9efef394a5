"""The batch-size experiment in examples/ still runs (smoke size), so it cannot go stale."""

import json
from pathlib import Path

import pytest
import torch

from tests._scripts import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "scaler_batch_size.py"


def test_experiment_smoke_run(tmp_path):
    module = load_script(SCRIPT)
    threads = torch.get_num_threads()
    try:
        module.main(["--smoke", "--lrs", "0.05", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "results.json").read_text())
    assert len(record["runs"]) == 4 * 3
    assert (tmp_path / "scaler_batch_size.png").stat().st_size > 10_000


ADASCALE = SCRIPT.with_name("scaler_adascale.py")


def test_adascale_experiment_smoke_run(tmp_path, monkeypatch):
    module = load_script(ADASCALE)
    threads = torch.get_num_threads()
    try:
        module.main(["--smoke", "--tasks", "mlp", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "results.json").read_text())
    rules = {(r["scale"], r["rule"]) for r in record["runs"]}
    assert rules == {(1, "none"), *((2, rule) for rule in module.RULES)}
    linear = next(r for r in record["runs"] if r["rule"] == "linear")
    assert linear["mean_gain"] == 2.0
    for run in record["runs"]:
        if run["rule"] == "adascale":
            assert 1.0 <= run["mean_gain"] <= 2.0
            assert run["samples"] == linear["samples"]  # equal samples
    assert (tmp_path / "scaler_adascale.png").stat().st_size > 10_000


def test_noise_truth_experiment_smoke_run(tmp_path, monkeypatch):
    path = SCRIPT.with_name("scaler_noise_truth.py")
    module = load_script(path)
    threads = torch.get_num_threads()
    try:
        record = module.main(["--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    first = record["runs"][0][0]
    assert first["truth"] > 0
    assert 0 < first["per_sample"] < float("inf")
    assert (tmp_path / "scaler_noise_truth.png").stat().st_size > 10_000


def test_noise_truth_reference_is_the_per_example_formula(monkeypatch):
    """The experiment's ground truth equals tr Σ/‖G‖² from an explicit per-example loop."""
    path = SCRIPT.with_name("scaler_noise_truth.py")
    module = load_script(path)
    teacher, student = module._teacher_student(0)
    x, y = module._data(teacher, 64, torch.Generator().manual_seed(0))
    grads = []
    for i in range(64):
        student.zero_grad()
        torch.nn.functional.mse_loss(student(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in student.parameters()]).double())
    g = torch.stack(grads)
    trace = (g - g.mean(0)).square().sum(1).sum() / 63
    signal = g.mean(0).square().sum() - trace / 64
    assert module.ground_truth(student, x, y) == pytest.approx(float(trace / signal), rel=1e-4)
