"""Two gloo ranks equal one process on all the data: all_reduce(), collect_loader(distributed=
True) and the ``gradstats fisher`` command. One spawn of two CPU processes (module fixture)
computes everything the rank-side tests read; ``torchrun`` itself is exercised under ``-m slow``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gradstats.errors import ConfigurationError
from gradstats.fisher import FisherCollector
from gradstats.testing import run_gloo

TINY_GPT2 = ["--set", "n_layer=1", "n_embd=8", "n_head=2", "vocab_size=256", "n_positions=16"]


def _data():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)
    ).double()
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (10,), generator=g)
    return model, x, y


def _loader(x, y):
    return [(x[i : i + 2], y[i : i + 2]) for i in range(0, 10, 2)]  # 5 batches


def _summary(fc):
    return {
        "fisher": fc.fisher(),
        "se": fc.standard_error(),
        "mean": fc.mean_gradient(),
        "mask": fc.group_fisher("mask"),
        "mask_se": fc.group_standard_error("mask"),
        "counts": dict(fc.counts),  # a plain dict: weights_only pickling
    }


def _cli_args(text: Path, out: Path) -> list[str]:
    return [
        "fisher",
        "gpt2",
        "--text",
        str(text),
        "--out",
        str(out),
        "--seq-len",
        "8",
        "--batch-size",
        "2",
        "--max-batches",
        "3",
        "--no-progress",
        *TINY_GPT2,
    ]


def _tiny_source(source, overrides, **options):
    """A causal LM without transformers (whose import would dominate the spawned ranks)."""
    model = torch.nn.Sequential(
        torch.nn.Embedding(256, 4), torch.nn.Tanh(), torch.nn.Linear(4, 256)
    )
    model.vocab_size = 256
    return model, None, "tiny byte-level LM"


def _main(args, patch):
    import gradstats.cli._fisher as cli
    from gradstats.cli import main

    original = cli.load_source
    cli.load_source = _tiny_source if patch else original
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return main(args)
    finally:
        cli.load_source = original


def _rank(rank, world_size, folder):
    torch.set_default_dtype(torch.float64)  # spawned ranks do not inherit conftest's default
    model, x, y = _data()
    rows = slice(0, 3) if rank == 0 else slice(3, 10)  # uneven shards
    fc = FisherCollector(model, element_se=True).collect(x[rows], y[rows])
    result = {"all_reduce": _summary(fc.all_reduce())}
    fc = FisherCollector(model, element_se=True)
    fc.collect_loader(_loader(x, y), distributed=True, max_batches=4, progress=False)
    result["loader"] = _summary(fc)
    out = Path(folder) / "ranks"
    result["cli_status"] = _main(_cli_args(Path(folder) / "text.txt", out), patch=True)
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranks")
    (folder / "text.txt").write_text("to be or not to be, that is the question. " * 8)
    return folder, run_gloo(_rank, world_size=2, args=(str(folder),))


def _assert_summary(result, expected, ignore_batches=False):
    counts = dict(result["counts"])
    if ignore_batches:
        counts["batches"] = expected["counts"]["batches"]
    assert counts == expected["counts"]
    for key in ("fisher", "se", "mean", "mask", "mask_se"):
        for name, value in expected[key].items():
            torch.testing.assert_close(result[key][name], value, msg=f"{key} {name}")


def test_all_reduce_equals_one_process(ranks):
    _, results = ranks
    model, x, y = _data()
    expected = _summary(FisherCollector(model, element_se=True).collect(x, y))
    for result in results:
        assert result["all_reduce"]["counts"]["batches"] == 2  # one batch per rank
        _assert_summary(result["all_reduce"], expected, ignore_batches=True)


def test_distributed_collect_loader_shards_batches_and_reduces(ranks):
    # batches 0, 2 on rank 0 and 1, 3 on rank 1 (max_batches=4 counts all ranks' batches)
    _, results = ranks
    model, x, y = _data()
    expected = FisherCollector(model, element_se=True)
    expected = _summary(expected.collect_loader(_loader(x, y), max_batches=4, progress=False))
    for result in results:
        _assert_summary(result["loader"], expected)
    assert expected["counts"]["samples"] == 8


def test_fisher_command_on_two_ranks_equals_one_process(ranks, tmp_path, capsys):
    # run_fisher inside an existing process group: sharded batches, all_reduce, rank 0 writes
    folder, results = ranks
    assert [r["cli_status"] for r in results] == [0, 0]
    assert _main(_cli_args(folder / "text.txt", tmp_path / "one"), patch=True) == 0
    capsys.readouterr()
    two = FisherCollector.load(folder / "ranks" / "fisher.safetensors")
    one = FisherCollector.load(tmp_path / "one" / "fisher.safetensors")
    assert two.counts == one.counts
    assert one.counts["samples"] == 6
    for name, value in one.fisher().items():
        torch.testing.assert_close(two.fisher()[name], value, msg=name)
    for fam, value in one.group_fisher("mask").items():
        torch.testing.assert_close(two.group_fisher("mask")[fam], value, msg=fam)
    assert sorted(p.name for p in (folder / "ranks").iterdir()) == [
        "fisher.safetensors",
        "summary.json",
    ]
    assert '"world_size": 2' in (folder / "ranks" / "summary.json").read_text()


def test_distributed_loader_refuses_until_rel_se():
    model, x, y = _data()
    with pytest.raises(
        ConfigurationError, match="until_rel_se cannot be combined with distributed"
    ):
        FisherCollector(model).collect_loader(_loader(x, y), distributed=True, until_rel_se=0.1)


def test_all_reduce_without_a_process_group_is_a_no_op():
    model, x, y = _data()
    fc = FisherCollector(model).collect(x, y)
    before = fc.fisher()
    for name, value in fc.all_reduce().fisher().items():
        torch.testing.assert_close(value, before[name])


@pytest.mark.slow
def test_fisher_command_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node 2 --no-python gradstats fisher ...`` (about 15 s)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    gradstats = shutil.which("gradstats") or str(Path(sys.executable).with_name("gradstats"))
    if not (Path(torchrun).exists() and Path(gradstats).exists()):
        pytest.skip("torchrun or the gradstats script is not installed")
    (tmp_path / "text.txt").write_text("to be or not to be, that is the question. " * 8)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [torchrun, "--nproc_per_node", "2", "--no-python", gradstats]
    args = _cli_args(tmp_path / "text.txt", tmp_path / "two")
    done = subprocess.run(
        [*command, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    one = subprocess.run(
        [gradstats, *_cli_args(tmp_path / "text.txt", tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    a = FisherCollector.load(tmp_path / "one" / "fisher.safetensors")
    b = FisherCollector.load(tmp_path / "two" / "fisher.safetensors")
    assert b.counts == a.counts
    assert '"world_size": 2' in (tmp_path / "two" / "summary.json").read_text()
    for name, value in a.fisher().items():
        torch.testing.assert_close(b.fisher()[name], value, msg=name)
