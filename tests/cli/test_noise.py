"""``gradstats noise SOURCE``: B_noise against a per-example autograd loop, outputs, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from gradstats.cli import main

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs",
         "into", "the", "dark", "forest"]  # fmt: skip
TINY = ["--set", "n_layer=1", "n_embd=32", "n_head=2", "vocab_size=300", "n_positions=32",
        "bos_token_id=0", "eos_token_id=0"]  # fmt: skip
SHAPE = ["--seq-len", "16", "--batch-size", "4", "--batches", "3"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(WORDS[(7 * i + i // 5) % len(WORDS)] for i in range(200)))
    return path


def _run(args, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = main(["noise", *args, "--no-progress"])
    return status, capsys.readouterr()


def _reference(text: Path, seed: int, batches: int, batch: int, seq_len: int):
    """Per-batch (tr Σ, ‖G‖²) of the same model and batches by a per-sequence autograd loop."""
    from gradstats.cli._fisher_source import encode, load_source, overrides, vocab_size
    from gradstats.cli._lm_text import token_rows
    from gradstats.cli._noise import sequence_losses
    from gradstats.testing import reference_per_sample_noise

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, _ = load_source("gpt2", overrides(tuple(TINY[1:])))
    model = model.double().eval()
    rows = token_rows(encode(text.read_text(), None, vocab_size(model)), seq_len, model)
    values = []
    for b in range(batches):
        ids = rows[b * batch : (b + 1) * batch]
        ref = reference_per_sample_noise(
            model, ids, lambda out, r, ids=ids: sequence_losses(out, ids[r]).sum()
        )
        values.append((ref["global"]["trace_sigma"], ref["global"]["signal"]))
    return torch.tensor(values, dtype=torch.float64)


def test_global_b_noise_equals_a_per_example_autograd_reference(tmp_path, text, capsys):
    out = tmp_path / "out"
    args = ["gpt2", "--text", str(text), "--out", str(out), "--dtype", "float64", *SHAPE]
    status, captured = _run([*args, *TINY], capsys)
    assert status == 0, captured.err
    result = json.loads((out / "noise.json").read_text())
    assert {"format_version", "source", "model", "global", "layers", "per_batch"} <= set(result)
    assert result["model"] == "gpt2"
    assert result["sequences"] == 12
    assert set(result["layers"]) == {
        "transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.ln_f"
    }  # fmt: skip
    overall = result["global"]
    for key in ("B_noise", "B_noise_se", "trace_sigma", "grad_sq_norm", "suggested_batch_size"):
        assert overall[key] is not None, key
    ref = _reference(text, 0, 3, 4, 16)
    got = torch.tensor([result["per_batch"]["trace_sigma"], result["per_batch"]["grad_sq_norm"]])
    torch.testing.assert_close(got.T, ref, rtol=1e-9, atol=0.0)  # float64 end to end
    expected = float(ref[:, 0].mean() / ref[:, 1].mean())
    assert overall["B_noise"] == pytest.approx(expected, rel=1e-9)
    assert overall["suggested_batch_size"] == max(1, round(expected))
    layer_sum = sum(r["trace_sigma"] for r in result["layers"].values())
    assert layer_sum == pytest.approx(overall["trace_sigma"], rel=1e-12)
    assert (out / "noise.png").stat().st_size > 1000
    assert "global" in captured.out
    assert "transformer.h.0" in captured.out


def test_the_standard_error_is_the_delta_method_over_batches(tmp_path, text, capsys):
    from gradstats.cli._noise_stats import group_estimate

    trace = torch.tensor([4.0, 6.0, 5.0, 9.0], dtype=torch.float64)
    signal = torch.tensor([1.0, 2.0, 1.5, 1.5], dtype=torch.float64)
    row = group_estimate(trace, signal)
    assert row["B_noise"] == pytest.approx(6.0 / 1.5)
    # Var(T̄ − R Ḡ)/Ḡ²: residuals T_b − 4 G_b = 0, −2, −1, 3, their variance 14/3 over N = 4
    assert row["B_noise_se"] == pytest.approx((14 / 3 / 4) ** 0.5 / 1.5)
    assert row["trace_sigma_se"] == pytest.approx(float(trace.std()) / 2)
    assert group_estimate(trace[:1], signal[:1])["B_noise_se"] is None
    no_signal = group_estimate(trace, -signal)
    assert no_signal["B_noise"] is None
    assert no_signal["no_signal"]


def test_the_plot_names_the_model_and_labels_its_axes(tmp_path, text, capsys, monkeypatch):
    from matplotlib.figure import Figure

    seen = []
    original = Figure.savefig

    def record(self, *args, **kwargs):
        ax = self.axes[0]
        seen.append((ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), len(ax.patches)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    args = ["gpt2", "--text", str(text), "--out", str(tmp_path / "out"), *SHAPE]
    status, captured = _run([*args, *TINY], capsys)
    assert status == 0, captured.err
    ((title, xlabel, ylabel, bars),) = seen
    assert title.startswith("gpt2: gradient noise scale per layer")
    assert (xlabel, bars) == ("layer", 4)
    assert ylabel.startswith("B_noise")


def _run_folder(tmp_path):
    from gradstats.data import text_corpus
    from gradstats.eqprop import models, train

    data = tmp_path / "corpus.txt"
    data.write_text("abc de cab bad ace " * 40)
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
    return run


def test_a_run_folder_defaults_to_its_corpus(tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(_run_folder(tmp_path)), "--out", str(out), "--seq-len", "8"]
    status, captured = _run([*args, "--batch-size", "2", "--batches", "2"], capsys)
    assert status == 0, captured.err
    result = json.loads((out / "noise.json").read_text())
    assert result["source"].endswith("(EquilibriumTransformer, step 3)")
    assert result["sequences"] == 4
    assert result["global"]["trace_sigma"] > 0
    assert all(line.startswith("gradstats noise: note: ") for line in captured.err.splitlines())


def _unwritable(tmp_path: Path) -> Path:
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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gpt2", *TINY], "--text FILE is required"),
        (["gpt2", "--text", "/nonexistent/text.txt", *TINY], "no text file /nonexistent/text.txt"),
        (["gpt2", "--text", "TEXT", "--batches", "0", *TINY], "--batches must be >= 1; got 0"),
        (["gpt2", "--text", "TEXT", "--batch-size", "1", *TINY], "--batch-size must be >= 2"),
        (
            ["gpt2", "--text", "TEXT", "--set", "n_layers=1"],
            "gpt2 configs have no key 'n_layers' (did you mean n_layer?)",
        ),
        (["gpt2", "--text", "TEXT", "--out", "UNWRITABLE", *TINY], "cannot write in"),
        (
            ["gpt2", "--text", "TEXT", "--seq-len", "16", "--batch-size", "500", *TINY],
            "fewer than --batch-size 500",
        ),
        (["no_such_model_type", "--text", "TEXT"], "unknown model type 'no_such_model_type'"),
    ],
    ids=[
        "no-text",
        "text-missing",
        "batches-0",
        "batch-size-1",
        "unknown-set-key",
        "unwritable-out",
        "too-few-sequences",
        "unknown-model-type",
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, text, capsys):
    names = {"TEXT": str(text)}
    if "UNWRITABLE" in args:
        names["UNWRITABLE"] = str(_unwritable(tmp_path))
    args = [names.get(a, a) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    status, captured = _run(args, capsys)
    assert status == 2
    err = captured.err.strip()
    assert message in err
    assert "\n" not in err
    assert "Traceback" not in err


def test_help_explains_b_noise(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["noise", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "critical batch size" in out
    assert "--batches BATCHES" in out
    assert "tr Σ / ‖G‖²" in out


@pytest.mark.slow
def test_noise_command_under_torchrun(tmp_path, text):
    """``torchrun --nproc_per_node 2 gradstats noise ...`` equals one process (about 30 s)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    gradstats = str(Path(sys.executable).with_name("gradstats"))
    if not (Path(torchrun).exists() and Path(gradstats).exists()):
        pytest.skip("torchrun or the gradstats script is not installed")
    common = ["gpt2", "--text", str(text), "--dtype", "float64", *SHAPE, *TINY, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = []
    for world in (1, 2):
        out = tmp_path / f"out{world}"
        command = [torchrun, "--nproc_per_node", str(world), "--no-python", gradstats, "noise"]
        done = subprocess.run(
            [*command, *common, "--out", str(out)], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr
        results.append(json.loads((out / "noise.json").read_text()))
    assert results[1]["world_size"] == 2
    for key in ("trace_sigma", "grad_sq_norm"):
        one, two = results[0]["per_batch"][key], results[1]["per_batch"][key]
        assert two == pytest.approx(one, rel=1e-12)
    assert results[1]["global"]["B_noise"] == pytest.approx(results[0]["global"]["B_noise"])
