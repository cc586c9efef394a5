"""examples/eqprop_no_plateau.py: its command lines are valid runs; the table from run folders."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import gradstats.eqprop.train as train_module
from gradstats.cli import main
from tests._scripts import load_example

EXAMPLE = Path(__file__).parents[2] / "examples" / "eqprop_no_plateau.py"


def _load():
    return load_example("eqprop_no_plateau")


def test_the_commands_are_valid_runs_of_the_small_configuration(tmp_path, monkeypatch):
    example = _load()
    seen = {}

    def fake_train(config, explicit=None):
        seen[config.out.name] = config
        return SimpleNamespace(val_ce=None, step=0, skipped_steps=0, unconverged_fraction=0.0)

    monkeypatch.setattr(train_module, "train", fake_train)
    for name in example.RUNS:
        argv = example.command(name, tmp_path)
        assert main(argv[argv.index("eqprop") :]) == 0
    assert set(seen) == {
        "aep", "bptt", "backprop", "backprop_thin", "aep_fixed", "aep_small_beta", "aep_jac",
        "bptt_jac", "aep_spec", "bptt_spec", "aep_bound", "bptt_bound", "aep_bound1", "bptt_t1",
        "bptt_t2", "bptt_t4", "aep_layered", "bptt_layered", "aep_layered_fb", "bptt_layered_fb",
        "aep_layered_loop", "bptt_layered_loop", "aep_layered_loop6", "bptt_layered_damped",
        "aep_layered_fb01", "aep_layered_loop_fb01",
    }  # fmt: skip
    for config in seen.values():
        assert (config.d_model, config.n_heads, config.block_size) == (64, 4, 64)
        unrolled = {"bptt_t1": 1, "bptt_t2": 2, "bptt_t4": 4, "bptt_layered": 2,
                    "bptt_layered_damped": 2}  # fmt: skip
        unrolled = unrolled.get(config.out.name, 60)
        assert (config.batch_size, config.steps, config.t1, config.seed) == (16, 2000, unrolled, 0)
        assert (config.threads, config.eval_batches, config.lr) == (1, 8, 3e-3)
    for name in ("aep", "bptt"):  # the same controller: the same objective family
        assert seen[name].contraction_target == seen["aep"].contraction_target is not None
        assert seen[name].controller_gain == seen["aep"].controller_gain
        assert (seen[name].jac_penalty, seen[name].res_penalty) == (0.1, 1.0)
        assert seen[name].ema_decay == seen["aep"].ema_decay
    assert (seen["aep"].beta, seen["aep"].tol_adjoint) == (0.05, 1e-3)
    for name in ("aep_layered", "bptt_layered"):  # the feed-forward fixed point: no stabiliser
        assert (seen[name].attn_mode, seen[name].damping, seen[name].feedback) == ("layered", 0, 0)
        assert not seen[name].penalties()
    for name in ("aep_layered_fb", "bptt_layered_fb", "aep_layered_loop", "bptt_layered_loop"):
        assert (seen[name].attn_mode, seen[name].damping, seen[name].feedback) == (
            "layered",
            1,
            0.5,
        )
    for name in ("aep_layered_loop", "bptt_layered_loop", "aep_layered_loop6"):
        assert (seen[name].jac_norm, seen[name].jac_penalty) == ("loop", 0.1)  # loop gain
        assert seen[name].res_penalty == 0.0
    assert seen["aep_layered_loop"].contraction_target == 0.3
    assert seen["aep_layered_loop6"].contraction_target == 0.6
    assert seen["aep_layered_loop6"].feedback == 0.5
    assert seen["aep_layered_fb01"].feedback == seen["aep_layered_loop_fb01"].feedback == 0.1
    assert not seen["aep_layered_fb01"].penalties()
    assert seen["aep_layered_loop_fb01"].jac_norm == "loop"
    damped = seen["bptt_layered_damped"]
    assert (damped.attn_mode, damped.damping, damped.feedback) == ("layered", 1, 0)
    assert (seen["aep_small_beta"].beta, seen["aep_small_beta"].tol_adjoint) == (0.002, 1e-3)
    assert seen["aep_small_beta"].contraction_target == seen["aep"].contraction_target
    assert seen["backprop_thin"].ffn_mult == 1
    assert seen["aep_fixed"].contraction_target is None
    assert (seen["aep_fixed"].jac_penalty, seen["aep_fixed"].res_penalty) == (0.1, 1.0)
    for name in ("aep_jac", "bptt_jac"):  # the Jacobian penalty alone, fixed
        assert (seen[name].jac_penalty, seen[name].res_penalty) == (0.1, 0.0)
        assert seen[name].contraction_target is None
    for name in ("aep_spec", "bptt_spec"):  # the controller on the spectral norm
        assert (seen[name].jac_norm, seen[name].res_penalty) == ("spectral", 0.0)
        assert seen[name].contraction_target == seen["aep"].contraction_target
    for name in ("aep_bound", "bptt_bound"):  # a Lipschitz bound, fixed weight
        assert (seen[name].jac_norm, seen[name].jac_bound, seen[name].jac_penalty) == (
            "spectral", 0.5, 0.3,
        )  # fmt: skip
        assert seen[name].contraction_target is None
    for name in ("aep_spec", "aep_bound", "aep_bound1"):
        assert (seen[name].method, seen[name].beta) == ("aep", 0.002)
    assert (seen["aep_bound1"].jac_bound, seen["aep_bound1"].jac_penalty) == (1.0, 0.3)
    assert seen["bptt_spec"].method == seen["bptt_bound"].method == "bptt"
    for name in ("bptt_t1", "bptt_t2", "bptt_t4"):  # unrolled, unpenalised
        assert (seen[name].method, seen[name].penalties()) == ("bptt", {})
    assert (seen["aep_jac"].beta, seen["aep_jac"].method, seen["bptt_jac"].method) == (
        0.002,
        "aep",
        "bptt",
    )


def test_residual_penalty_and_target_replace_the_controlled_values(tmp_path):
    example = _load()
    line = example.command("bptt", tmp_path, res_penalty=0.0, target=0.5)
    assert line[line.index("--res-penalty") + 1] == "0"
    assert line[line.index("--contraction-target") + 1] == "0.5"
    assert example.command("backprop", tmp_path, res_penalty=0.0) == example.command(
        "backprop", tmp_path
    )  # runs without the option are unchanged


def test_the_dry_run_prints_and_runs_nothing(tmp_path, capsys):
    assert _load().main(["--dry-run", "--runs", str(tmp_path)]) == {}
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(_load().RUNS) == 26
    assert all(line.count(" --t1 ") == 1 for line in lines)  # the run's own T1 replaces 60
    assert all("--steps 2000" in line for line in lines)
    assert not any(tmp_path.iterdir())


def test_the_table_reads_the_checkpoints_and_cpu_time(tmp_path):
    example = _load()
    for i, name in enumerate(example.RUNS):
        (tmp_path / name).mkdir()
        last = 1200 if name == "aep_fixed" else 2000  # a run that stopped (diverged)
        checks = [s for s in (500, 1000, 1500, 2000) if s <= last]
        records = [{"step": s, "val_ce": 3.0 - s / 1000 + i / 10, "time": s} for s in checks]
        records.append({"step": last, "time": last})
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records)
        )
    (tmp_path / "aep" / "cpu.json").write_text('{"cpu_seconds": 90.0, "returncode": 0}\n')
    rows, final = example.table(tmp_path)
    assert final == {"aep": 1.0, "bptt": 1.1, "backprop": 1.2, "backprop_thin": 1.3,
                     "aep_fixed": pytest.approx(2.4), "aep_small_beta": pytest.approx(1.5),
                     "aep_jac": pytest.approx(1.6), "bptt_jac": pytest.approx(1.7),
                     "aep_spec": pytest.approx(1.8), "bptt_spec": pytest.approx(1.9),
                     "aep_bound": pytest.approx(2.0), "bptt_bound": pytest.approx(2.1),
                     "aep_bound1": pytest.approx(2.2), "bptt_t1": pytest.approx(2.3),
                     "bptt_t2": pytest.approx(2.4), "bptt_t4": pytest.approx(2.5),
                     "aep_layered": pytest.approx(2.6), "bptt_layered": pytest.approx(2.7),
                     "aep_layered_fb": pytest.approx(2.8),
                     "bptt_layered_fb": pytest.approx(2.9),
                     "aep_layered_loop": pytest.approx(3.0),
                     "bptt_layered_loop": pytest.approx(3.1),
                     "aep_layered_loop6": pytest.approx(3.2),
                     "bptt_layered_damped": pytest.approx(3.3),
                     "aep_layered_fb01": pytest.approx(3.4),
                     "aep_layered_loop_fb01": pytest.approx(3.5)}  # fmt: skip
    assert rows[0] == ["aep", "2.500", "2.000", "1.500", "1.000", "0.909", "-0.200", "1.5"]
    assert rows[1][-3:] == ["1.000", "-0.100", "33.3 (wall)"]  # no cpu.json: the wall clock
    (tmp_path / "bptt" / "cpu.json").write_text('{"returncode": 2}\n')  # no CPU time recorded
    assert example.table(tmp_path)[0][1][-1] == "33.3 (wall)"
    assert rows[4][1:5] == ["2.900", "2.400", "-", "2.400 @1000, stopped at 1200"]
    rows, _ = example.table(tmp_path, ("aep_jac", "bptt_jac", "backprop"), reference="bptt_jac")
    assert [row[-3] for row in rows] == [f"{1.6 / 1.7:.3f}", "1.000", f"{1.2 / 1.7:.3f}"]


def test_a_stopped_run_with_cpu_json_is_not_rerun(tmp_path):
    example = _load()
    (tmp_path / "aep").mkdir()
    (tmp_path / "aep" / "metrics.jsonl").write_text('{"step": 7, "time": 1.0}\n')
    assert not example._done(tmp_path / "aep")
    (tmp_path / "aep" / "cpu.json").write_text('{"cpu_seconds": 1.0, "returncode": 2}\n')
    assert example._done(tmp_path / "aep")


def test_seed_and_only_choose_the_runs_and_their_seed(tmp_path, capsys):
    example = _load()
    only = "aep_small_beta,bptt,backprop"
    assert example.main(["--dry-run", "--runs", str(tmp_path), "--seed", "1", "--only", only]) == {}
    lines = capsys.readouterr().out.splitlines()
    assert [line.rsplit("/", 1)[-1] for line in lines] == only.split(",")
    assert all(" --seed 1 " in line and " --seed 0 " not in line for line in lines)
    assert (
        example.command("aep", tmp_path)[example.command("aep", tmp_path).index("--seed") + 1]
        == "0"
    )
    for bad in ("aep,backprop", "bptt,backprop,nope"):  # bptt missing; an unknown run
        with pytest.raises(SystemExit):
            example.main(["--dry-run", "--runs", str(tmp_path), "--only", bad])
    with pytest.raises(SystemExit):  # the reference BPTT run must be among the runs
        example.main(["--dry-run", "--runs", str(tmp_path), "--only", only, "--bptt", "bptt_jac"])
    jac = ["--only", "aep_jac,bptt_jac,backprop", "--bptt", "bptt_jac"]
    assert example.main(["--dry-run", "--runs", str(tmp_path), *jac]) == {}
