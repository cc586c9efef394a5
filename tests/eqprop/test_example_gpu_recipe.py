"""examples/eqprop_gpu_recipe.py: its four command lines are valid `gradstats eqprop train` runs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import gradstats.eqprop.train as train_module
from gradstats.cli import _eqprop, main
from tests._scripts import load_example

EXAMPLE = Path(__file__).parents[2] / "examples" / "eqprop_gpu_recipe.py"


def _load():
    return load_example("eqprop_gpu_recipe")


def test_the_recipe_commands_are_valid_runs_at_the_original_scale(tmp_path, monkeypatch):
    recipe = _load()
    seen = {}

    def fake_train(config, explicit=None):
        seen[config.out.name] = config
        return SimpleNamespace(val_ce=None, step=0, skipped_steps=0, unconverged_fraction=0.0)

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.setattr(_eqprop, "resolve_device", lambda device: None)  # no CUDA here
    for name in recipe.RUNS:
        argv = recipe.command(name, tmp_path, "cuda")
        assert main(argv[argv.index("eqprop") :]) == 0
    assert set(seen) == set(recipe.RUNS)
    for config in seen.values():
        assert (config.d_model, config.block_size, config.steps) == (256, 256, 14000)
        assert config.precision == "tf32"
        assert config.device == "cuda"
    assert seen["aep"].contraction_target == 0.2
    assert seen["aep"].ema_decay == 0.999
    assert seen["backprop_thin"].ffn_mult == 1
    layered = seen["aep_layered"]
    assert (layered.attn_mode, layered.damping, layered.ema_decay) == ("layered", 0, 0.999)
    assert not layered.penalties()


def test_the_dry_run_prints_and_runs_nothing(tmp_path, capsys):
    assert _load().main(["--dry-run", "--runs", str(tmp_path)]) == {}
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert all("--precision tf32" in line for line in lines)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["aep", "backprop"])
def test_cpu_commands_use_one_thread_and_no_tf32(tmp_path, name):
    line = _load().command(name, tmp_path, "cpu", steps=2)
    assert "--precision" not in line
    assert line[line.index("--threads") + 1] == "1"
    assert line[line.index("--steps") + 1] == "2"
