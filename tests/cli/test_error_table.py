"""The CLI never shows a traceback: a table of bad input and failing environments.

Every row goes through the real entry point (``gradstats.cli.main``; the ``subprocess`` rows
through ``python -m gradstats``) and must exit with its status (2, or 130 when interrupted)
with exactly one line on stderr naming the problem and no traceback. Rows marked
``before_compute`` also prove that the failure comes before any compute: the compute entry
points (training, probing, Fisher collection, benchmarks, the demo's runs) are tripwires.
"""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from gradstats.cli import main

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 40
SMALL = ["--d-model", "8", "--n-heads", "2", "--block-size", "4", "--batch-size", "1",
         "--eval-every", "1", "--eval-batches", "1", "--no-progress"]  # fmt: skip
TINY_GPT2 = ["--set", "n_layer=1", "n_embd=8", "n_head=2", "vocab_size=300", "n_positions=32",
             "bos_token_id=0", "eos_token_id=0", "--no-progress"]  # fmt: skip
TINY_DEMO = ["--steps", "2", "--d-model", "8", "--n-heads", "2", "--block-size", "8",
             "--batch-size", "2", "--micro-batches", "1", "--probe-batch", "1",
             "--fisher-sequences", "2", "--scaler-steps", "2", "--reference-sequences", "2",
             "--workers", "1", "--no-progress"]  # fmt: skip
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


class Computed(BaseException):
    """Raised by a tripwire: the command started computing (not caught by the CLI)."""


def _tripwire(*args, **kwargs):
    raise Computed("the command started computing before it failed")


def _full_disk_torch_save(obj, f, *args, **kwargs):
    """torch.save on a full disk: some bytes reach the file, then ENOSPC."""
    if hasattr(f, "write"):
        f.write(b"PK\x03\x04partial")
    else:
        Path(f).write_bytes(b"PK\x03\x04partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_disk_fisher_save(self, path):
    Path(path).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A complete step-0 run of a tiny equilibrium transformer (its folder)."""
    from gradstats.eqprop.train import TrainConfig, train

    folder = tmp_path_factory.mktemp("tiny")
    data = folder / "text.txt"
    data.write_text(TEXT)
    run = folder / "run"
    cfg = TrainConfig(out=run, data=str(data), d_model=8, n_heads=2, block_size=4,
                      batch_size=1, progress=False)  # fmt: skip
    train(cfg, until=0)
    return run


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (``/sys`` for root, else a 0o500 folder)."""
    if os.name == "posix" and os.geteuid() == 0:
        where = Path("/sys")
    else:
        where = tmp_path / "locked"
        where.mkdir()
        where.chmod(0o500)
    try:
        tempfile.TemporaryFile(dir=where).close()
    except OSError:
        return where / "gradstats-out"
    pytest.skip(f"{where} is writable here")


def _checkpoint(path: Path, run: Path, change) -> Path:
    """A copy of ``run``'s checkpoint with ``change(state)`` applied, in folder ``path``."""
    from gradstats.eqprop.train._checkpoint import save_checkpoint

    state = torch.load(run / "checkpoint.pt", weights_only=True)
    change(state)
    path.mkdir()
    save_checkpoint(path / "checkpoint.pt", {k: v for k, v in state.items()})
    # the data file the run was trained on travels with its config
    return path


def _files(tmp_path: Path, run: Path) -> dict[str, str]:
    """The placeholders of the table, made in ``tmp_path``."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    file = tmp_path / "a-file.txt"
    file.write_text("not a folder\n")
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    (tmp_path / "broken.json").write_text('{"model_type": "gpt2",')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    pickle_file = tmp_path / "objects.pt"
    pickle_file.write_bytes(pickle.dumps({"x": Path("."), "f": print}))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "checkpoint.pt").write_bytes(b"")
    nonempty = tmp_path / "user-folder"
    nonempty.mkdir()
    (nonempty / "thesis.tex").write_text("mine")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    read_only = tmp_path / "read-only.json"
    read_only.write_text("{}")
    read_only.chmod(0o444)
    (tmp_path / "no-suites").mkdir()
    bad_suites = tmp_path / "bad-suites"
    bad_suites.mkdir()
    (bad_suites / "bench_broken.py").write_text("x = (\n")
    metrics = tmp_path / "bad-metrics"
    _checkpoint(metrics, run, lambda s: None)
    (metrics / "metrics.jsonl").write_text('{"step": 0}\nnot json\n')

    def drop(*keys):
        def change(state):
            for key in keys:
                state.pop(key)

        return change

    def nested_drop(state):
        state["rng"].pop("noise")

    def config_list(state):
        state["config"] = ["not", "a", "dict"]

    def wider(state):
        state["model_config"] = {**state["model_config"], "d_model": 12, "n_heads": 3}

    cases = {
        "LACKS_MODEL": drop("model", "model_class"),
        "LACKS_OPTIMIZER": drop("optimizer"),
        "LACKS_NOISE": nested_drop,
        "CONFIG_LIST": config_list,
        "WIDER": wider,
    }
    names = {name: str(_checkpoint(tmp_path / name.lower(), run, f)) for name, f in cases.items()}
    return {
        **names,
        "RUN": str(run),
        "TEXT": str(text),
        "FILE": str(file),
        "UNDER_FILE": str(file / "out"),
        "OUT": str(tmp_path / "out"),
        "LIST_JSON": str(tmp_path / "list.json"),
        "BROKEN_JSON": str(tmp_path / "broken.json"),
        "LATIN1": str(tmp_path / "latin1.txt"),
        "PICKLE": str(pickle_file),
        "LIST_PT": str(tmp_path / "list.pt"),
        "EMPTY_RUN": str(empty),
        "NONEMPTY": str(nonempty),
        "BAD_METRICS": str(metrics),
        "TMP": str(tmp_path),
        "FIFO": str(tmp_path / "fifo"),
        "LOOP": str(tmp_path / "loop-a"),
        "READ_ONLY": str(read_only),
        "NO_SUITES": str(tmp_path / "no-suites"),
        "BAD_SUITES": str(bad_suites),
    }


_OUT_COMMANDS = {
    "demo": ["demo", *TINY_DEMO],
    "bench": ["bench", "moments", "--smoke"],
    "train": ["eqprop", "train", "--data", "TEXT", *SMALL],
    "probe": ["eqprop", "probe", "RUN"],
    "fisher": ["fisher", "gpt2", "--text", "TEXT", *TINY_GPT2],
}
_OUT_CASES = {
    "file": ("FILE", "is a file, not a folder"),
    "under-a-file": ("UNDER_FILE", "a-file.txt is a file, not a folder"),
    "unwritable": ("UNWRITABLE", "cannot write in"),
}

# id -> (argv, message in the line, before_compute, patches, status, marks)
# patches: {"module:attribute": replacement}; "!SUBPROCESS" as argv[0] runs python -m gradstats
TABLE: dict[str, tuple] = {
    **{
        f"{name}-out-{case}": ([*argv, "--out", where], message, True, {}, 2, ())
        for name, argv in _OUT_COMMANDS.items()
        for case, (where, message) in _OUT_CASES.items()
    },
    "train-device-meta": (["eqprop", "train", "--device", "meta", "--out", "OUT", *SMALL],
                          "--device meta: a meta tensor holds no data", True, {}, 2, ()),
    "train-device-cuda": (["eqprop", "train", "--device", "cuda", "--out", "OUT", *SMALL],
                          "--device cuda: no CUDA device is available", True, {}, 2, (NO_CUDA,)),
    "train-device-typo": (["eqprop", "train", "--device", "gpu7", "--out", "OUT"],
                          "device", True, {}, 2, ()),
    "fisher-device-meta": (["fisher", "gpt2", "--text", "TEXT", "--device", "meta", "--out",
                            "OUT", *TINY_GPT2], "--device meta", True, {}, 2, ()),
    "fisher-device-cuda": (["fisher", "gpt2", "--text", "TEXT", "--device", "cuda", "--out",
                            "OUT", *TINY_GPT2], "no CUDA device is available", True, {}, 2,
                           (NO_CUDA,)),
    "train-disk-full": (["eqprop", "train", "--data", "TEXT", "--out", "OUT", *SMALL],
                        "No space left on device", False,
                        {"torch:save": _full_disk_torch_save}, 2, ()),
    "demo-disk-full": (["demo", *TINY_DEMO, "--out", "OUT"], "No space left on device", False,
                       {"torch:save": _full_disk_torch_save}, 2, ()),
    "fisher-disk-full": (["fisher", "gpt2", "--text", "TEXT", "--max-batches", "1",
                          "--seq-len", "8", "--out", "OUT", *TINY_GPT2],
                         "No space left on device", False,
                         {"gradstats.fisher:FisherCollector.save": _full_disk_fisher_save}, 2, ()),
    "probe-disk-full": (["eqprop", "probe", "RUN", "--out", "OUT", "--methods", "aep",
                         "--batch-size", "1", "--t2-sweep", "--points-sweep", "--no-float64"],
                        "No space left on device", False,
                        {"gradstats.eqprop:ProbeReport.save": _full_disk}, 2, ()),
    "fisher-seq-len-above-positions": (["fisher", "gpt2", "--text", "TEXT", "--seq-len", "40",
                                        "--out", "OUT", *TINY_GPT2],
                                       "--seq-len 40 exceeds the model's 32 positions", True,
                                       {}, 2, ()),
    "fisher-config-json-list": (["fisher", "LIST_JSON", "--text", "TEXT", "--out", "OUT"],
                                "must hold a JSON object", True, {}, 2, ()),
    "fisher-config-json-broken": (["fisher", "BROKEN_JSON", "--text", "TEXT", "--out", "OUT"],
                                  "is not valid JSON", True, {}, 2, ()),
    "fisher-nosuchdir": (["fisher", "nosuchdir", "--text", "TEXT", "--out", "OUT"],
                         "no such folder or model type: 'nosuchdir'", True, {}, 2, ()),
    "fisher-model-type-typo": (["fisher", "gtp2", "--text", "TEXT", "--out", "OUT"],
                               "did you mean gpt2?", True, {}, 2, ()),
    "fisher-run-lacks-keys": (["fisher", "LACKS_MODEL", "--text", "TEXT", "--out", "OUT"],
                              "misses model_class, model", True, {}, 2, ()),
    "fisher-text-not-utf8": (["fisher", "gpt2", "--text", "LATIN1", "--out", "OUT"],
                             "is not UTF-8 text", True, {}, 2, ()),
    "fisher-text-is-a-folder": (["fisher", "gpt2", "--text", "TMP", "--out", "OUT"],
                                "no text file", True, {}, 2, ()),
    "probe-text-file": (["eqprop", "probe", "FILE"], "not a gradstats checkpoint", True, {}, 2,
                        ()),
    "probe-pickle-of-objects": (["eqprop", "probe", "PICKLE", "--out", "OUT"],
                                "a pickle of objects other than tensors", True, {}, 2, ()),
    "probe-torch-file-of-a-list": (["eqprop", "probe", "LIST_PT", "--out", "OUT"],
                                   "not a gradstats training checkpoint", True, {}, 2, ()),
    "probe-empty-checkpoint": (["eqprop", "probe", "EMPTY_RUN"], "an empty file", True, {}, 2,
                               ()),
    "probe-lacks-keys": (["eqprop", "probe", "LACKS_MODEL", "--out", "OUT"],
                         "incomplete checkpoint: it misses model_class, model", True, {}, 2, ()),
    "probe-config-is-a-list": (["eqprop", "probe", "CONFIG_LIST", "--out", "OUT"],
                               "config (list, not dict)", True, {}, 2, ()),
    "probe-weights-do-not-fit": (["eqprop", "probe", "WIDER", "--out", "OUT"],
                                 "weights do not fit its EquilibriumTransformer", True, {}, 2, ()),
    "resume-lacks-optimizer": (["eqprop", "train", "--resume", "--out", "LACKS_OPTIMIZER"],
                               "misses optimizer", True, {}, 2, ()),
    "resume-lacks-nested-key": (["eqprop", "train", "--resume", "--out", "LACKS_NOISE"],
                                "misses rng.noise", True, {}, 2, ()),
    "resume-corrupt-metrics": (["eqprop", "train", "--resume", "--steps", "2", "--out",
                                "BAD_METRICS", "--no-progress"],
                               "line 2: not a metrics record", False, {}, 2, ()),
    "train-out-holds-a-run": (["eqprop", "train", "--out", "RUN", "--no-progress"],
                              "already holds a run", False, {}, 2, ()),
    "train-data-is-a-folder": (["eqprop", "train", "--data", "TMP", "--out", "OUT",
                                "--no-progress"], "--data", False, {}, 2, ()),
    "demo-out-foreign-folder": (["demo", "--out", "NONEMPTY"],
                                "is not empty and is not the output of an earlier gradstats demo",
                                True, {}, 2, ()),
    "bench-repeats-zero": (["bench", "--repeats", "0", "--out", "OUT"], "--repeats must be >= 1",
                           True, {}, 2, ()),
    # --out of sample is a file: never a device or FIFO (the atomic rename would replace the node
    # itself: /dev/null, as root), a link loop or a read-only file
    "sample-out-fifo": (["eqprop", "sample", "RUN", "--tokens", "2", "--out", "FIFO"],
                        "is not a regular file", True, {}, 2, ()),
    "sample-out-link-loop": (["eqprop", "sample", "RUN", "--tokens", "2", "--out", "LOOP"],
                             "is a broken symbolic link (or a loop of links)", True, {}, 2, ()),
    "sample-out-read-only": (["eqprop", "sample", "RUN", "--tokens", "2", "--out", "READ_ONLY"],
                             "is a read-only file", True, {}, 2, ()),
    "fisher-set-wrong-type": (["fisher", "gpt2", "--text", "TEXT", "--out", "OUT", "--set",
                               "n_layer=abc", "n_embd=8", "n_head=2", "--no-progress"],
                              "n_layer", True, {}, 2, ()),
    "fisher-set-negative-layers": (["fisher", "gpt2", "--text", "TEXT", "--out", "OUT", "--set",
                                    "n_layer=-1", "n_embd=8", "n_head=2", "--no-progress"],
                                   "num_hidden_layers must be >= 1; got -1", True, {}, 2, ()),
    # the probe runs one group of methods after another: every value is checked before the first
    "probe-r-zero": (["eqprop", "probe", "RUN", "--r", "0", "--out", "OUT"],
                     "--r must be a finite number > 0", True, {}, 2, ()),
    "probe-points-sweep-zero": (["eqprop", "probe", "RUN", "--points-sweep", "0", "--out", "OUT"],
                                "--points-sweep values must be >= 1", True, {}, 2, ()),
    "probe-t2-override-zero": (["eqprop", "probe", "RUN", "--t2", "0", "--out", "OUT"],
                               "--t2 must be >= 1", True, {}, 2, ()),
    "bench-dir-without-suites": (["bench", "--dir", "NO_SUITES", "--smoke", "--out", "OUT"],
                                 "no bench_<name>.py suites", True, {}, 2, ()),
    "bench-suite-syntax-error": (["bench", "broken", "--dir", "BAD_SUITES", "--smoke", "--out",
                                  "OUT"], "bench_broken.py failed to import: SyntaxError", False,
                                 {}, 2, ()),
    "interrupted": (["fisher", "gpt2", "--text", "TEXT", "--out", "OUT"], "fisher: interrupted",
                    True, {"gradstats.cli._fisher:run_fisher": _interrupt}, 130, ()),
    "subprocess-probe-text-file": (["!SUBPROCESS", "eqprop", "probe", "FILE"],
                                   "not a gradstats checkpoint", True, {}, 2, ()),
    "subprocess-fisher-nosuchdir": (["!SUBPROCESS", "fisher", "nosuchdir", "--text", "TEXT"],
                                    "no such folder or model type", True, {}, 2, ()),
}  # fmt: skip

_TRIPWIRES = (
    "gradstats.eqprop.train._loop:_run",
    "gradstats.eqprop:probe",
    "gradstats.fisher:FisherCollector.collect_loader",
    "gradstats.bench:run_suites",
    "gradstats.cli._demo:_train_both",
)


def _patch(monkeypatch, target: str, value) -> None:
    module_name, _, attribute = target.partition(":")
    owner = __import__(module_name, fromlist=["_"])
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    monkeypatch.setattr(owner, name, value)


ROWS = [
    pytest.param(argv, message, before, patches, status, id=name, marks=marks)
    for name, (argv, message, before, patches, status, marks) in TABLE.items()
]


@pytest.mark.parametrize(("argv", "message", "before_compute", "patches", "status"), ROWS)
def test_error_table(argv, message, before_compute, patches, status, tmp_path, tiny_run,
                     monkeypatch, capsys):  # fmt: skip
    names = _files(tmp_path, tiny_run)
    if "UNWRITABLE" in argv:
        names["UNWRITABLE"] = str(_unwritable(tmp_path))
    args = [names.get(a, a) for a in argv]
    monkeypatch.delenv("GRADSTATS_DEBUG", raising=False)
    if args[0] == "!SUBPROCESS":
        done = subprocess.run(
            [sys.executable, "-m", "gradstats", *args[1:]],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            cwd=tmp_path,
        )
        code, err = done.returncode, done.stderr
    else:
        for target, value in patches.items():
            _patch(monkeypatch, target, value)
        if before_compute:
            for target in _TRIPWIRES:
                _patch(monkeypatch, target, _tripwire)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main(args)
        err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == status, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert message in lines[0]
    assert "weights_only" not in lines[0]  # never torch's advice for a file that is not ours
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers


def test_debug_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADSTATS_DEBUG", "1")
    file = tmp_path / "a-file.txt"
    file.write_text("x")
    from gradstats.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="is a file, not a folder"):
        main(["bench", "--out", str(file)])


@pytest.mark.parametrize(
    "argv",
    [
        ["eqprop", "train", "--out", ""],
        ["eqprop", "sample", ""],
        ["fisher", "gpt2", "--text", ""],
        ["bench", "--out", ""],
        ["demo", "--out", ""],
    ],
    ids=["train-out", "sample-run", "fisher-text", "bench-out", "demo-out"],
)
def test_an_empty_path_is_refused_not_read_as_the_current_folder(argv, capsys):
    """``Path("")`` is ``.``: ``train --out ""`` used to write its run into the current folder."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("an empty path; give a file or folder name")
