"""``gradstats fisher SOURCE``: HF folders, config JSON, model types; outputs and errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from gradstats.cli import main
from gradstats.fisher import FisherCollector

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "and",
    "runs",
    "into",
    "the",
    "dark",
    "forest",
]
TINY = ["--set", "n_layer=2", "n_embd=16", "n_head=4", "vocab_size=300", "n_positions=32"]


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(200)))
    return path


def _run(args, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = main(["fisher", *args, "--no-progress"])
    return status, capsys.readouterr()


def test_model_type_with_overrides_writes_file_table_and_heatmap(tmp_path, text, capsys):
    out = tmp_path / "out"
    args = ["gpt2", "--text", str(text), "--out", str(out), "--seq-len", "16", "--max-batches", "2"]
    status, captured = _run([*args, *TINY], capsys)
    assert status == 0, captured.err
    assert "layers.0.attn.heads" in captured.out or "layers.1.attn.heads" in captured.out
    assert (out / "heads_heatmap.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokenizer"] == "byte-level fallback"
    assert summary["counts"]["samples"] == 8
    loaded = FisherCollector.load(out / "fisher.safetensors")
    assert loaded.counts["tokens"] == 8 * 15
    assert loaded.kind == "empirical"


def test_config_json_source(tmp_path, text, capsys):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 1,
                "hidden_size": 8,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "intermediate_size": 12,
                "vocab_size": 256,
            }
        )
    )
    out = tmp_path / "out"
    args = [
        str(config),
        "--text",
        str(text),
        "--out",
        str(out),
        "--seq-len",
        "8",
        "--max-batches",
        "1",
    ]
    status, captured = _run(
        [*args, "--kind", "mc", "--mc-samples", "2", "--rank-by", "trace"], capsys
    )
    assert status == 0, captured.err
    assert FisherCollector.load(out / "fisher.safetensors").kind == "mc"


def test_hugging_face_folder_with_weights_and_tokenizer(tmp_path, text, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path / "hf"
    vocab = {w: i for i, w in enumerate(["[UNK]", *sorted(set(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=len(vocab), n_positions=16)
    GPT2LMHeadModel(config).save_pretrained(folder)
    out = tmp_path / "out"
    args = [
        str(folder),
        "--text",
        str(text),
        "--out",
        str(out),
        "--seq-len",
        "10",
        "--unit",
        "token",
    ]
    status, captured = _run(args, capsys)
    assert status == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokenizer"] == "model tokenizer"
    assert summary["counts"]["samples"] == 20
    assert "random weights" not in summary["source"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gpt2"], "--text FILE is required"),
        (["gpt2", "--text", "/nonexistent/text.txt"], "no text file /nonexistent/text.txt"),
        (["no_such_model_type", "--text", "TEXT"], "unknown model type 'no_such_model_type'"),
        (["gpt2", "--text", "TEXT", "--set", "n_layer"], "--set expects KEY=VALUE"),
        (["gpt2", "--text", "TEXT", "--seq-len", "0"], "--seq-len must be >= 1"),
        (["gpt2", "--text", "TEXT", "--mc-samples", "3"], "--mc-samples applies to --kind mc only"),
        (["RUN", "--text", "TEXT"], "checkpoint.pt is not a readable checkpoint"),
        (["EMPTY", "--text", "TEXT"], "neither a Hugging Face model folder (config.json) nor"),
        (["gpt2", "--text", "TEXT", "--seq-len", "5000", *TINY], "fewer than --seq-len 5000"),
        (
            ["llama", "--text", "TEXT", "--set", "n_layer=2", "n_embd=64"],
            "llama configs have no key 'n_layer' (did you mean num_hidden_layers?); valid keys: ",
        ),
        (
            ["gpt2", "--text", "TEXT", "--set", "n_layers=2"],
            "gpt2 configs have no key 'n_layers' (did you mean n_layer?)",
        ),
        (["llama", "--text", "TEXT"], "has 6.74B parameters, above the 400M limit"),
        (
            ["gpt2", "--text", "TEXT", "--kind", "exact", "--seq-len", "16", *TINY],
            "more than max_exact_passes=4096",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, text, capsys):
    run_folder, empty = tmp_path / "run", tmp_path / "empty"
    run_folder.mkdir()
    empty.mkdir()
    (run_folder / "checkpoint.pt").write_bytes(b"")
    names = {"TEXT": str(text), "RUN": str(run_folder), "EMPTY": str(empty)}
    args = [names.get(a, a) for a in args]
    status, captured = _run([*args, "--out", str(tmp_path / "out")], capsys)
    assert status == 2
    err = captured.err.strip()
    assert message in err
    assert "\n" not in err


def test_help_lists_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fisher", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "(default: empirical)" in out
    assert "byte" in out


def test_gradstats_run_folder_of_an_equilibrium_transformer(tmp_path, capsys):
    from gradstats.eqprop import models, train

    config = dict(vocab_size=6, block_size=8, d_model=8, n_heads=2)
    model = models.EquilibriumTransformer(**config)
    run = tmp_path / "run"
    run.mkdir()
    train._checkpoint.save_checkpoint(
        run / "checkpoint.pt",
        {
            "config": {},
            "model_class": "EquilibriumTransformer",
            "model_config": model.config(),
            "model": model.state_dict(),
            "step": 3,
            "corpus": {"name": "tiny", "sha256": "", "vocab": " abcde"},
        },
    )
    text = tmp_path / "text.txt"
    text.write_text("abc de cab bad ace " * 4)
    out = tmp_path / "out"
    args = [
        str(run),
        "--text",
        str(text),
        "--out",
        str(out),
        "--seq-len",
        "8",
        "--max-batches",
        "1",
    ]
    status, captured = _run(args, capsys)
    assert status == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"].endswith("(EquilibriumTransformer, step 3)")
    assert summary["handlers"] == {"EquilibriumTransformer": "loop"}
    assert (out / "heads_heatmap.png").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on CPU-only machines")
def test_device_cuda_without_a_gpu_is_a_one_line_error(tmp_path, text, capsys):
    args = ["gpt2", "--text", str(text), "--out", str(tmp_path / "out"), "--device", "cuda"]
    status, captured = _run([*args, *TINY], capsys)
    assert status == 2
    assert "--device cuda: no CUDA device is available" in captured.err
    assert not (tmp_path / "out").exists()


def test_the_parameter_count_is_printed_before_building(tmp_path, text, capsys):
    args = ["gpt2", "--text", str(text), "--out", str(tmp_path / "out"), "--seq-len", "16"]
    status, captured = _run([*args, "--max-batches", "1", *TINY], capsys)
    assert status == 0, captured.err
    first = captured.out.splitlines()[0]
    assert first.startswith("model type 'gpt2' (random weights): ")
    assert "parameters" in first


@pytest.mark.parametrize("weights", [True, False], ids=["save_pretrained", "config only"])
def test_hugging_face_folder_without_tokenizer_files_uses_bytes(weights, tmp_path, text, capsys):
    """transformers 5.x returns an empty-vocabulary tokenizer here: the byte fallback is used."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "hf"
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=300, n_positions=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if weights:
            GPT2LMHeadModel(config).save_pretrained(folder)
        else:
            config.save_pretrained(folder)
    out = tmp_path / "out"
    args = [str(folder), "--text", str(text), "--out", str(out), "--seq-len", "8"]
    status, captured = _run([*args, "--max-batches", "1"], capsys)
    assert status == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokenizer"] == "byte-level fallback"
    assert summary["counts"]["samples"] == 4


def _run_folder(tmp_path, corpus_text):
    from gradstats.data import text_corpus
    from gradstats.eqprop import models, train

    data = tmp_path / "corpus.txt"
    data.write_text(corpus_text)
    corpus = text_corpus(data)
    model = models.EquilibriumTransformer(
        vocab_size=corpus.vocab_size, block_size=8, d_model=8, n_heads=2
    )
    run = tmp_path / "run"
    run.mkdir()
    train._checkpoint.save_checkpoint(
        run / "checkpoint.pt",
        {
            "config": {"data": str(data)},
            "model_class": "EquilibriumTransformer",
            "model_config": model.config(),
            "model": model.state_dict(),
            "step": 3,
            "corpus": {"name": "tiny", "sha256": corpus.sha256, "vocab": corpus.vocab},
        },
    )
    return run, data


def test_a_run_folder_defaults_to_its_corpus_with_one_note_line(tmp_path, capsys):
    run, _ = _run_folder(tmp_path, "abc de cab bad ace " * 40)
    out = tmp_path / "out"
    args = [str(run), "--out", str(out), "--seq-len", "8", "--max-batches", "1"]
    status, captured = _run(args, capsys)
    assert status == 0, captured.err
    assert json.loads((out / "summary.json").read_text())["counts"]["samples"] == 4
    notes = captured.err.strip().splitlines()
    assert notes == [
        "gradstats fisher: note: EquilibriumTransformer: per-sequence gradients by the implicit "
        "function theorem at the fixed point, one sequence at a time (exact, slow)"
    ]


def test_a_run_folder_whose_corpus_changed_needs_text(tmp_path, capsys):
    run, data = _run_folder(tmp_path, "abc de cab bad ace " * 40)
    data.write_text("something else entirely " * 40)
    status, captured = _run([str(run), "--out", str(tmp_path / "out")], capsys)
    assert status == 2
    assert "changed since training (SHA-256 differs); pass --text FILE" in captured.err


def test_the_heatmap_names_the_model_and_labels_its_colorbar(tmp_path, text, capsys, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    original = Figure.savefig

    def record(self, *args, **kwargs):
        figures.append((self.axes[0].get_title(), self.axes[1].get_ylabel()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    args = ["gpt2", "--text", str(text), "--out", str(tmp_path / "out"), "--seq-len", "16"]
    status, captured = _run([*args, "--max-batches", "1", *TINY], capsys)
    assert status == 0, captured.err
    ((title, colorbar),) = figures
    assert title.startswith("gpt2: mask Fisher per head")
    assert colorbar == "mask Fisher E[(Σ θ·g)²] of the head"
