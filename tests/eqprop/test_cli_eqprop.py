"""``gradstats eqprop train`` / ``probe``: runs end to end, bad input exits 2 with one line."""

import json

import pytest

from gradstats.cli import main

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 40
SMALL = ["--d-model", "16", "--n-heads", "2", "--block-size", "12", "--batch-size", "3",
         "--eval-every", "2", "--eval-batches", "1", "--checkpoint-every", "2",
         "--no-progress", "--init-std", "0.1"]  # fmt: skip


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return str(path)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_train_then_probe(tmp_path, data, capsys):
    run = tmp_path / "run"
    args = ["eqprop", "train", "--steps", "2", "--out", str(run), "--data", data, *SMALL]
    assert main(args) == 0
    assert {"checkpoint.pt", "metrics.jsonl", "curves.png"} <= {p.name for p in run.iterdir()}
    code = main(["eqprop", "probe", str(run), "--t2-sweep", "5", "20", "--points-sweep", "2", "4",
                 "--tol-adjoint", "1e-5"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "overrides: tol_adjoint=1e-05 (run: None)" in out
    assert "diagnose:" in out
    report = json.loads((run / "probe.json").read_text())
    assert report["checkpoint"]["step"] == 2
    assert report["model"]["config"]["d_model"] == 16
    assert {r["method"] for r in report["rows"]} == {"aep", "holomorphic", "ep_symmetric"}
    assert {r["sweep"] for r in report["rows"]} == {None, "T2", "beta", "points"}
    assert report["diagnose"]
    assert (run / "probe.png").exists()


def test_unknown_method(capsys):
    assert main(["eqprop", "train", "--method", "sgd"]) == 2
    assert "method must be one of" in _error_line(capsys)


def test_data_too_short(tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("to be or not to be")
    args = ["eqprop", "train", "--data", str(path), "--out", str(tmp_path / "r"), *SMALL]
    assert main(args) == 2
    assert "fewer than block_size + 1 = 13" in _error_line(capsys)


def test_probe_missing_checkpoint(tmp_path, capsys):
    assert main(["eqprop", "probe", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint at" in _error_line(capsys)


def test_probe_corrupt_checkpoint(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage")
    assert main(["eqprop", "probe", str(tmp_path)]) == 2
    assert "not a readable checkpoint" in _error_line(capsys)


def test_resume_missing_checkpoint(tmp_path, capsys):
    assert main(["eqprop", "train", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "no checkpoint at" in _error_line(capsys)


def test_diverging_run_exits_2_with_one_line(tmp_path, data, capsys):
    args = ["eqprop", "train", "--method", "bptt", "--lr", "1e30", "--warmup", "0", "--grad-clip",
            "0", "--max-skips", "2", "--steps", "10", "--out", str(tmp_path / "r"), "--data", data,
            *SMALL]  # fmt: skip
    assert main(args) == 2
    line = _error_line(capsys)
    assert "training diverged" in line
    assert "last good checkpoint (step 0)" in line
