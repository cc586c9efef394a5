"""``gradstats eqprop train`` / ``probe``: runs end to end, bad input exits 2 with one line."""

import json
from pathlib import Path

import pytest

from gradstats.cli import main

SMALL = ["--d-model", "16", "--n-heads", "2", "--block-size", "12", "--batch-size", "3",
         "--eval-every", "2", "--eval-batches", "1", "--checkpoint-every", "2",
         "--no-progress", "--init-std", "0.1"]  # fmt: skip


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


def test_probe_uses_the_runs_beta_only_for_methods_of_its_kind(tmp_path, data, capsys, monkeypatch):
    """An AEP run's beta is a real nudge: holomorphic keeps its own default radius r."""
    from gradstats.eqprop._probe import ProbeReport
    from gradstats.eqprop.train import TrainConfig, train

    def plot(self, path, **kwargs):  # slow; tested above (an empty file keeps save() atomic)
        Path(path).write_bytes(b"")
        return Path(path)

    monkeypatch.setattr(ProbeReport, "plot", plot)
    run = tmp_path / "run"
    cfg = TrainConfig(out=run, data=data, beta=0.02, d_model=8, n_heads=2, block_size=4,
                      batch_size=1, progress=False)  # fmt: skip
    train(cfg, until=0)  # the step-0 checkpoint is enough for the probe
    probe = ["eqprop", "probe", str(run), "--methods", "aep", "holomorphic", "--batch-size",
             "1", "--t2-sweep", "--points-sweep", "--no-float64"]  # fmt: skip
    assert main(probe) == 0
    out = capsys.readouterr().out
    assert "aep beta=0.02 (the aep run's)" in out
    assert "holomorphic r=0.1 (model default)" in out
    report = json.loads((run / "probe.json").read_text())
    assert report["beta_used"]["holomorphic"] == {"value": 0.1, "source": "model default"}
    swept = {}
    for row in report["rows"]:
        if row["sweep"] == "beta" and row["group"] == "all":
            swept.setdefault(row["method"], []).append(row["value"])
    assert swept["aep"] == pytest.approx([0.005, 0.01, 0.02, 0.04])
    assert swept["holomorphic"] == pytest.approx([0.025, 0.05, 0.1, 0.2])


def test_probe_beta_overrides_apply_per_kind():
    """--beta sets the real nudges, --r the holomorphic radius; a holomorphic run's r is r."""
    from types import SimpleNamespace

    from gradstats.cli._eqprop_probe import ProbeConfig, _betas
    from gradstats.eqprop.models import EquilibriumTransformer

    model = EquilibriumTransformer(5, 4, 8, 2)
    methods = ["ep", "aep", "ep_symmetric", "holomorphic", "implicit"]
    holo_run = SimpleNamespace(method="holomorphic", beta=0.3)
    got = _betas(holo_run, ProbeConfig(), model, methods)
    assert got == {
        "ep": (0.01, "model default"),
        "aep": (0.05, "model default"),
        "ep_symmetric": (0.05, "model default"),
        "holomorphic": (0.3, "the holomorphic run's"),
    }
    aep_run = SimpleNamespace(method="aep", beta=0.02)  # aep and ep_symmetric share beta
    got = _betas(aep_run, ProbeConfig(), model, methods)
    assert {m: v for m, (v, _) in got.items()} == {
        "ep": 0.01,
        "aep": 0.02,
        "ep_symmetric": 0.02,
        "holomorphic": 0.1,
    }
    got = _betas(holo_run, ProbeConfig(beta=0.03, r=0.2), model, methods)
    assert {m: v for m, (v, _) in got.items()} == {
        "ep": 0.03,
        "aep": 0.03,
        "ep_symmetric": 0.03,
        "holomorphic": 0.2,
    }


def test_resume_with_nothing_left_to_do_exits_2_with_one_line(tmp_path, data, capsys):
    run = ["--out", str(tmp_path / "run"), "--data", data, "--method", "backprop", *SMALL]
    assert main(["eqprop", "train", "--steps", "2", *run]) == 0
    capsys.readouterr()
    for steps in ("2", "1"):  # at, or below, the checkpoint's step
        assert main(["eqprop", "train", "--resume", "--steps", steps, *run]) == 2
        line = _error_line(capsys)
        assert "nothing to do" in line
        assert "already at step 2" in line
    assert main(["eqprop", "train", "--resume", "--steps", "3", *run]) == 0
    assert "step 3: val CE" in capsys.readouterr().out


def test_bad_device_exits_2_with_one_line(capsys):
    assert main(["eqprop", "train", "--device", "gpu7"]) == 2
    assert "device must be a torch device" in _error_line(capsys)
