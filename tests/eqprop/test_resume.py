"""Runs that never lose their history: explicit options on resume, tampered checkpoints, the
metrics file under faults, Ctrl-C at a step boundary, threads and the process-group timeout."""

import errno
import json
import os
import re
import signal

import pytest
import torch

from gradstats.cli import main
from gradstats.eqprop.train import TrainConfig, load_checkpoint, read_metrics, train
from gradstats.eqprop.train._metrics import MetricsLog
from gradstats.eqprop.train._resume import merge_resume
from gradstats.eqprop.train._runtime import TrainingInterrupted, auto_threads
from gradstats.errors import ConfigurationError, StateError

SMALL = ["--d-model", "8", "--n-heads", "2", "--block-size", "6", "--batch-size", "2",
         "--eval-every", "2", "--eval-batches", "1", "--checkpoint-every", "2",
         "--spot-check-every", "0", "--no-progress"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("no_plot")  # curves.png: slow, not tested here


def _cfg(tmp_path, data, name="run", **kw):
    base = {"method": "backprop", "steps": 4, "out": tmp_path / name, "data": data, "d_model": 8,
            "n_heads": 2, "block_size": 6, "batch_size": 2, "eval_every": 2, "eval_batches": 1,
            "checkpoint_every": 2, "spot_check_every": 0, "progress": False}  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _cli(tmp_path, data, *extra, name="run"):
    return main(["eqprop", "train", "--data", data, "--out", str(tmp_path / name), *SMALL, *extra])


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- explicit options on resume
@pytest.mark.parametrize(
    ("trained", "given", "match"),
    [
        (["--lr", "0.01"], ["--lr", "0.003"], r"lr=0.003 \(run: 0.01\)"),  # the default, typed
        (["--lr", "0.01"], ["--lr", "0.004"], r"lr=0.004 \(run: 0.01\)"),
        (["--method", "bptt", "--t1", "5"], ["--method", "aep"], r"method='aep' \(run: 'bptt'\)"),
        (["--seed", "3"], ["--seed", "0"], r"seed=0 \(run: 3\)"),
    ],
)
def test_resume_refuses_any_typed_option_that_differs(tmp_path, data, capsys, trained, given,
                                                      match):  # fmt: skip
    assert _cli(tmp_path, data, "--steps", "2", *trained) == 0
    before = _files(tmp_path / "run")
    capsys.readouterr()
    assert _cli(tmp_path, data, "--steps", "4", "--resume", *given) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert re.search(match, err[0]), err[0]
    assert _files(tmp_path / "run") == before  # nothing written


@pytest.mark.parametrize("given", [["--lr", "0.01"], ["--threads", "1"], ["--timeout", "60"]])
def test_resume_accepts_typed_options_equal_to_the_run_or_resumable(tmp_path, data, given):
    assert _cli(tmp_path, data, "--steps", "2", "--lr", "0.01") == 0
    assert _cli(tmp_path, data, "--steps", "4", "--resume", *given) == 0
    assert load_checkpoint(tmp_path / "run")["step"] == 4


def test_python_resume_with_explicit_names_refuses_a_default_value(tmp_path, data):
    train(_cfg(tmp_path, data, steps=2, lr=0.01))
    with pytest.raises(ConfigurationError, match=r"lr=0.003 \(run: 0.01\)"):
        train(_cfg(tmp_path, data, resume=True), explicit={"lr", "resume"})


def test_python_resume_without_explicit_keeps_the_non_default_rule(tmp_path, data):
    train(_cfg(tmp_path, data, steps=2, lr=0.01))
    result = train(_cfg(tmp_path, data, resume=True))  # lr left at its default: not "given"
    assert result.step == 4
    assert load_checkpoint(tmp_path / "run")["config"]["lr"] == 0.01


def test_merge_resume_rejects_unknown_explicit_names():
    with pytest.raises(ConfigurationError, match=r"unknown training option\(s\) \['lrr'\]"):
        merge_resume(TrainConfig(), TrainConfig(), explicit={"lrr"})


# ---------------------------------------------------------------- tampered checkpoints
def _tamper_step(state):
    state["step"] = -1


def _tamper_half(state):
    state["model"] = {k: v.half() for k, v in state["model"].items()}


def _tamper_shape(state):
    name = next(k for k, v in state["model"].items() if v.dim() == 2)
    state["model"][name] = torch.zeros(3, 3)


def _tamper_optimizer_shape(state):
    entry = next(iter(state["optimizer"]["state"].values()))
    entry["exp_avg"] = torch.zeros(7)


def _tamper_optimizer_groups(state):
    state["optimizer"]["param_groups"].append(dict(state["optimizer"]["param_groups"][0]))


def _tamper_rng(state):
    state["rng"]["data"] = torch.zeros(3, dtype=torch.uint8)


def _tamper_rng_dtype(state):
    state["rng"]["torch"] = torch.zeros(5)


def _tamper_counter(state):
    state["counters"]["skipped"] = -2


def _tamper_counter_name(state):
    state["counters"]["bogus"] = 1


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (_tamper_step, r"step -1"),
        (_tamper_half, r"float16"),
        (_tamper_shape, r"wrong shape"),
        (_tamper_optimizer_shape, r"optimizer state exp_avg"),
        (_tamper_optimizer_groups, r"number of parameter groups"),
        (_tamper_rng, r"rng.data is not a valid generator state"),
        (_tamper_rng_dtype, r"rng.torch is not a generator state"),
        (_tamper_counter, r"skipped=-2"),
        (_tamper_counter_name, r"bogus=1"),
    ],
)
def test_resume_rejects_tampered_states_before_loading_anything(tmp_path, data, tamper, match):
    train(_cfg(tmp_path, data, steps=2))
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    tamper(state)
    torch.save(state, path)
    before = _files(tmp_path / "run")
    with pytest.raises(StateError, match=match):
        train(_cfg(tmp_path, data, resume=True))
    assert _files(tmp_path / "run") == before  # nothing rewritten: metrics, checkpoint


def test_cli_resume_of_a_tampered_state_exits_2_with_one_line(tmp_path, data, capsys):
    assert _cli(tmp_path, data, "--steps", "2") == 0
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    _tamper_half(state)
    torch.save(state, path)
    capsys.readouterr()
    assert _cli(tmp_path, data, "--steps", "4", "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "float16" in err[0]


# ---------------------------------------------------------------- metrics under faults
def test_a_truncated_last_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "train_')
    with pytest.warns(UserWarning, match=r"line 3: dropped a truncated last record"):
        records = read_metrics(path)
    assert records == [{"step": 1}, {"step": 2}]


def test_a_complete_bad_line_is_still_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(StateError, match=r"line 2: not a metrics record"):
        read_metrics(path)


def test_resume_after_a_partial_append_drops_the_partial_line(tmp_path, data):
    train(_cfg(tmp_path, data, steps=2))
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"step": 3, "tra')  # a full disk mid-append
    with pytest.warns(UserWarning, match="truncated last record"):
        train(_cfg(tmp_path, data, resume=True))
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4]


@pytest.mark.parametrize("fault", ["kill-before-rename", "full-disk-while-writing"])
def test_a_failed_rewrite_keeps_the_whole_history(tmp_path, monkeypatch, fault):
    path = tmp_path / "metrics.jsonl"
    original = "".join(json.dumps({"step": s, "train_ce": 1.0}) + "\n" for s in range(1, 6))
    path.write_text(original)
    import gradstats.eqprop.train._metrics as metrics_module

    if fault == "kill-before-rename":

        def replace(*args):
            raise KeyboardInterrupt

        monkeypatch.setattr(metrics_module.os, "replace", replace)
        error = KeyboardInterrupt
    else:

        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(metrics_module.os, "fsync", fsync)
        error = OSError
    with pytest.raises(error):
        MetricsLog(path).truncate(3)
    assert path.read_text() == original
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left


# ---------------------------------------------------------------- Ctrl-C
def _interrupt_at(monkeypatch, at):
    import gradstats.eqprop.train._loop as loop

    learning_rate = loop.learning_rate

    def lr(cfg, step):
        if step == at:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of this step
        return learning_rate(cfg, step)

    monkeypatch.setattr(loop, "learning_rate", lr)


def test_ctrl_c_finishes_the_step_saves_it_and_names_resume(tmp_path, data, monkeypatch):
    _interrupt_at(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted, match=r"step 3 saved .*--resume") as info:
        train(_cfg(tmp_path, data, steps=6, checkpoint_every=100))
    assert info.value.step == 3
    assert isinstance(info.value, KeyboardInterrupt)
    assert load_checkpoint(tmp_path / "run")["step"] == 3
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_ctrl_c_during_the_last_step_just_ends_the_run(tmp_path, data, monkeypatch):
    _interrupt_at(monkeypatch, 4)
    result = train(_cfg(tmp_path, data, steps=4))
    assert result.step == 4
    assert load_checkpoint(tmp_path / "run")["step"] == 4


def test_an_interrupted_run_resumes_bitwise(tmp_path, data, monkeypatch):
    full = train(_cfg(tmp_path, data, "full", steps=5, checkpoint_every=100))
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tmp_path, data, "parts", steps=5, checkpoint_every=100))
    monkeypatch.undo()
    import gradstats.eqprop.train._loop as loop

    monkeypatch.setattr(loop, "_plot", lambda *args: None)
    train(_cfg(tmp_path, data, "parts", steps=5, checkpoint_every=100, resume=True))
    a, b = load_checkpoint(full.checkpoint)["model"], load_checkpoint(tmp_path / "parts")["model"]
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def test_cli_ctrl_c_exits_130_with_one_line_naming_resume(tmp_path, data, monkeypatch, capsys):
    _interrupt_at(monkeypatch, 2)
    assert _cli(tmp_path, data, "--method", "backprop", "--steps", "4") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--resume" in err[0]
    assert "step 2 saved" in err[0]


# ---------------------------------------------------------------- threads and timeout
@pytest.mark.parametrize(
    ("elements", "available", "expected"),
    [(32 * 64 * 64, 16, 1), (2**19, 16, 1), (2**22, 16, 8), (2**26, 16, 16), (10, 1, 1)],
)
def test_auto_threads_rule(elements, available, expected):
    assert auto_threads(elements, available) == expected


def test_train_uses_auto_threads_and_restores_the_setting(tmp_path, data, monkeypatch):
    import gradstats.eqprop.train._loop as loop

    seen = []
    backprop_step = loop._backprop_step

    def step(*args):
        seen.append(torch.get_num_threads())
        return backprop_step(*args)

    monkeypatch.setattr(loop, "_backprop_step", step)
    before = torch.get_num_threads()
    train(_cfg(tmp_path, data, steps=2))
    assert set(seen) == {1}  # 2 * 6 * 8 state elements: one thread
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("value", [0, -1.0, float("nan")])
def test_timeout_must_be_positive(value):
    with pytest.raises(ConfigurationError, match="timeout"):
        TrainConfig(timeout=value)


def test_torchrun_group_rejects_a_bad_timeout(monkeypatch):
    from gradstats._torchrun import torchrun_process_group

    monkeypatch.setenv("WORLD_SIZE", "2")
    with (
        pytest.raises(ConfigurationError, match=r"timeout must be a number of seconds > 0"),
        torchrun_process_group("cpu", timeout=0),
    ):
        pass


def test_help_documents_threads_and_timeout(capsys):
    with pytest.raises(SystemExit):
        main(["eqprop", "train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--threads THREADS torch CPU threads (default: 1 per 2^19 state elements" in out
    assert "--timeout TIMEOUT under torchrun: seconds a process waits" in out


@pytest.mark.parametrize(
    ("message", "mapped"),
    [("[gloo/pair.cc:534] Timed out waiting 2000ms for recv operation", True),
     ("Connection closed by peer [127.0.0.1]:29500", True),
     ("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)", False)],
)  # fmt: skip
def test_cli_maps_a_failed_collective_to_one_line(tmp_path, data, monkeypatch, capsys, message,
                                                  mapped):  # fmt: skip
    from contextlib import contextmanager

    import gradstats.eqprop.train as train_package
    import gradstats.eqprop.train._distributed as distributed

    @contextmanager
    def two_ranks(device, timeout=None):
        yield distributed.Group(0, 2)

    def fails(config, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(distributed, "process_group_from_env", two_ranks)
    monkeypatch.setattr(train_package, "train", fails)
    if not mapped:  # not a group failure: a bug, shown as such
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            _cli(tmp_path, data, "--timeout", "5")
        return
    assert _cli(tmp_path, data, "--timeout", "5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "another process stopped answering within --timeout 5 s" in err[0]


@pytest.mark.parametrize(("given", "expected"), [(None, 1), (2, 2)])
def test_probe_runs_with_chosen_threads_and_restores_them(tmp_path, data, monkeypatch, given,
                                                          expected):  # fmt: skip
    import gradstats.eqprop as eqprop
    from gradstats.cli._eqprop_probe import ProbeConfig, run_probe

    train(_cfg(tmp_path, data, method="aep", steps=1), until=0)
    seen = []

    class Stop(Exception):
        pass

    def probe(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise Stop

    monkeypatch.setattr(eqprop, "probe", probe)
    before = torch.get_num_threads()
    with pytest.raises(Stop):
        run_probe(ProbeConfig(path=tmp_path / "run", batch_size=1, threads=given))
    assert seen == [expected]
    assert torch.get_num_threads() == before
