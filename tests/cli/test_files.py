"""The CLI's shared guards: output folders, devices, atomic writes, checkpoints, demo folders."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch

from gradstats._files import atomic_path, write_text_atomic
from gradstats.cli._checks import check_out_dir, resolve_device
from gradstats.cli._demo import MARKER, prepare_out
from gradstats.errors import ConfigurationError, StateError


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_check_out_dir_creates_nothing(tmp_path):
    out = tmp_path / "a" / "b"
    assert check_out_dir(out) == out
    assert _listing(tmp_path) == []


@pytest.mark.parametrize(
    ("relative", "message"),
    [("file.txt", "--out .*file.txt is a file, not a folder"),
     ("file.txt/sub/out", "file.txt is a file, not a folder")],
)  # fmt: skip
def test_check_out_dir_refuses_a_file(tmp_path, relative, message):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigurationError, match=message):
        check_out_dir(tmp_path / relative)


@pytest.mark.parametrize(
    ("name", "message"),
    [("meta", "--device meta: a meta tensor holds no data"),
     ("gpu7", "--device gpu7: not a torch device"),
     pytest.param("cuda", "--device cuda: no CUDA device is available",
                  marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check"))],
)  # fmt: skip
def test_resolve_device_refuses(name, message):
    with pytest.raises(ConfigurationError, match=message):
        resolve_device(name)


def test_resolve_device_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


def test_atomic_write_leaves_the_old_file_and_no_temporary_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def write_then_fail():
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            _enospc()

    with pytest.raises(OSError, match=r"cannot write .*summary\.json: No space left on device"):
        write_then_fail()
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["summary.json"]


def test_atomic_write_keeps_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = write_text_atomic(tmp_path / "report.md", "# report")
    assert path.read_text() == "# report"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def _tiny_state():
    from gradstats.eqprop.models import EquilibriumTransformer

    model = EquilibriumTransformer(vocab_size=6, block_size=4, d_model=8, n_heads=2)
    return {"config": {}, "model_class": "EquilibriumTransformer",
            "model_config": model.config(), "model": model.state_dict(), "step": 3}  # fmt: skip


def test_save_checkpoint_on_a_full_disk_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from gradstats.eqprop.train._checkpoint import save_checkpoint

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _tiny_state())
    before = path.read_bytes()
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the bytes reach the temporary file ...
        _enospc()  # ... and the disk fills up before they are all flushed

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"cannot write the checkpoint .*: No space left on device"):
        save_checkpoint(path, {**_tiny_state(), "step": 4})
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["checkpoint.pt"]


@pytest.mark.parametrize(
    ("require", "message"),
    [((), None), (("optimizer",), "misses optimizer"), (("rng.data",), "misses rng.data")],
)
def test_load_checkpoint_names_the_missing_keys(tmp_path, require, message):
    from gradstats.eqprop.train._checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "checkpoint.pt", _tiny_state())
    if message is None:
        assert load_checkpoint(tmp_path, require=require)["step"] == 3
        return
    with pytest.raises(StateError, match=message):
        load_checkpoint(tmp_path, require=require)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"model_class": "Nope"}, "unknown model class 'Nope'"),
     ({"model_config": {"d_model": 8}}, "model_config does not build"),
     ({"model": {}}, "weights do not fit its EquilibriumTransformer: [0-9]+ missing")],
)  # fmt: skip
def test_build_from_checkpoint_raises_state_errors(change, message):
    from gradstats.eqprop.train import build_from_checkpoint

    with pytest.raises(StateError, match=message):
        build_from_checkpoint({**_tiny_state(), **change})


def test_read_metrics_names_the_bad_line(tmp_path):
    from gradstats.eqprop.train import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(StateError, match=r"metrics\.jsonl, line 2: not a metrics record"):
        read_metrics(path)


def test_prepare_out_replaces_a_previous_demo_and_keeps_other_files(tmp_path):
    out = tmp_path / "demo"
    prepare_out(out)
    (out / "aep").mkdir()
    (out / "aep" / "checkpoint.pt").write_bytes(b"old run")
    (out / "report.md").write_text("old report")
    (out / "notes.txt").write_text("mine")
    prepare_out(out)
    assert _listing(out) == sorted([MARKER, "notes.txt"])


def test_prepare_out_accepts_an_old_demo_without_the_marker(tmp_path):
    (tmp_path / "demo.json").write_text("{}")
    (tmp_path / "bptt").mkdir()
    prepare_out(tmp_path)
    assert _listing(tmp_path) == [MARKER]


def test_prepare_out_refuses_a_folder_that_is_not_a_demos(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(ConfigurationError, match="is not empty and is not the output"):
        prepare_out(tmp_path)
    assert _listing(tmp_path) == ["thesis.tex"]


def test_atomic_write_through_a_link_writes_its_target_and_keeps_the_link(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_text_atomic(link, "new")
    assert link.is_symlink()
    assert real.read_text() == "new"


def test_atomic_write_refuses_what_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(IsADirectoryError, match="not a regular file"):
        write_text_atomic(fifo, "x")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_atomic_write_through_a_link_loop_is_one_oserror(tmp_path):
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    with pytest.raises(OSError, match="cannot write"):
        write_text_atomic(loop, "x")
