"""``gradstats eqprop sample``: text from tiny trained runs; bad input exits 2 with one line."""

import json

import pytest

from gradstats.cli import main

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 40
SMALL = ["--d-model", "16", "--n-heads", "2", "--block-size", "12", "--batch-size", "3",
         "--eval-every", "2", "--eval-batches", "1", "--checkpoint-every", "2",
         "--no-progress", "--init-std", "0.1", "--steps", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs trained for two steps: the equilibrium model (aep, bptt) and the backprop baseline."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "text.txt"
    data.write_text(TEXT)
    out = {}
    for method in ("aep", "bptt", "backprop"):
        out[method] = root / method
        args = ["eqprop", "train", "--method", method, "--out", str(out[method])]
        assert main([*args, "--data", str(data), *SMALL]) == 0
    return out


def _sample(run, *args):
    return main(["eqprop", "sample", str(run), *args])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("method", ["aep", "bptt", "backprop"])
def test_sample_prints_the_prompt_and_its_continuation(runs, method, capsys):
    capsys.readouterr()
    args = ["--prompt", "ROMEO:", "--tokens", "30", "--seed", "3", "--top-k", "5"]
    assert _sample(runs[method], *args) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:")
    assert len(first) == len("ROMEO:") + 30 + 1  # the newline of print()
    assert set(first) <= set(TEXT) | {"\n"}
    assert _sample(runs[method], *args) == 0
    assert capsys.readouterr().out == first  # the same seed prints the same text


def test_the_default_prompt_is_a_newline(runs, capsys):
    capsys.readouterr()
    assert _sample(runs["aep"], "--tokens", "5") == 0
    out = capsys.readouterr().out
    assert out.startswith("\n")
    assert len(out) == 1 + 5 + 1


def test_a_bptt_run_is_sampled_at_its_fixed_point(runs, tmp_path):
    out = tmp_path / "s.json"
    assert _sample(runs["bptt"], "--tokens", "3", "--out", str(out)) == 0
    assert json.loads(out.read_text())["solver"] == {}  # the model's tol and step cap


def test_greedy_sampling_ignores_the_seed(runs, capsys):
    capsys.readouterr()
    texts = []
    for seed in ("0", "1"):
        assert _sample(runs["aep"], "--prompt", "But", "--temperature", "0", "--seed", seed) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_out_writes_a_json_record(runs, tmp_path, capsys):
    out = tmp_path / "sample.json"
    out.write_text("old")  # an existing file is replaced
    assert _sample(runs["aep"], "--prompt", "soft", "--tokens", "12", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["prompt"] == "soft"
    assert len(record["text"]) == 12
    assert printed == "soft" + record["text"] + "\n"
    assert record["checkpoint"]["step"] == 2
    assert record["checkpoint"]["method"] == "aep"
    assert record["model"]["d_model"] == 16
    assert record["solver"]["max_steps"] == 30
    assert not list(tmp_path.glob("*.tmp"))


def test_characters_outside_the_vocabulary_exit_2_with_one_line(runs, capsys):
    assert _sample(runs["aep"], "--prompt", "ROMEO#Zq") == 2
    line = _error_line(capsys)
    assert "--prompt holds characters not in the run's vocabulary: '#Zq'" in line


BAD = [
    (["--tokens", "-1"], "--tokens must be >= 0"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--prompt", ""], "--prompt is empty"),
]


@pytest.mark.parametrize(("args", "match"), BAD)
def test_bad_options_exit_2_with_one_line(runs, capsys, args, match):
    capsys.readouterr()
    assert _sample(runs["aep"], *args) == 2
    assert match in _error_line(capsys)


def test_an_out_that_is_a_folder_exits_2_with_one_line(runs, tmp_path, capsys):
    assert _sample(runs["aep"], "--out", str(tmp_path)) == 2
    assert "is a folder; give a file name" in _error_line(capsys)


def test_an_out_under_a_file_exits_2_with_one_line(runs, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _sample(runs["aep"], "--out", str(tmp_path / "file" / "s.json")) == 2
    assert "is a file, not a folder" in _error_line(capsys)


def test_a_missing_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    assert _sample(tmp_path / "nothing") == 2
    assert "no checkpoint at" in _error_line(capsys)


def test_a_corrupt_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_text("not a checkpoint")
    assert _sample(tmp_path) == 2
    assert "not a gradstats checkpoint" in _error_line(capsys)


def test_a_checkpoint_whose_vocabulary_does_not_fit_exits_2_with_one_line(runs, tmp_path, capsys):
    import torch

    state = torch.load(runs["aep"] / "checkpoint.pt", weights_only=True)
    state["corpus"]["vocab"] = state["corpus"]["vocab"][:-1]
    torch.save(state, tmp_path / "checkpoint.pt")
    assert _sample(tmp_path) == 2
    assert "vocabulary (27 characters) does not fit its model's 28 tokens" in _error_line(capsys)


def test_a_checkpoint_with_nan_weights_exits_2_with_one_line(runs, tmp_path, capsys):
    import torch

    state = torch.load(runs["backprop"] / "checkpoint.pt", weights_only=True)
    state["model"]["readout.proj"][0, 0] = float("nan")
    torch.save(state, tmp_path / "checkpoint.pt")
    assert _sample(tmp_path) == 2
    assert "non-finite weights (NaN or inf) in readout.proj" in _error_line(capsys)
