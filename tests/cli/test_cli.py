import json
import subprocess
import sys

import pytest

import gradstats
from gradstats.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert gradstats.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out
    assert "bench" in out


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_each_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "(default:" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "gradstats", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"gradstats {gradstats.__version__}"


def test_demo_writes_its_report_and_runs_again_in_the_same_folder(tmp_path, capsys):
    """The README says to run it again: a second run with the same --out replaces the first."""
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "6", "--d-model", "16", "--n-heads", "2",
            "--block-size", "16", "--batch-size", "4", "--micro-batches", "2", "--probe-batch",
            "2", "--fisher-sequences", "4", "--scaler-steps", "4", "--reference-sequences", "8",
            "--workers", "1",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    first = json.loads((out / "demo.json").read_text())
    (out / "notes.txt").write_text("the user's own file")
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "the user's own file"  # not the demo's: kept
    report = (out / "report.md").read_text()
    assert report.startswith("# gradstats demo")
    for figure in ("curves.png", "probe/probe.png", "fisher/heads_heatmap.png", "scaler_trace.png"):
        assert f"]({figure})" in report
        assert (out / figure).stat().st_size > 1000
    record = json.loads((out / "demo.json").read_text())
    assert set(record["training"]) == {"aep", "bptt"}
    assert all(run["val_ce"] > 0 for run in record["training"].values())
    assert set(record["probe"]["min_cos"]) == {"aep", "holomorphic"}
    assert record["fisher"]["counts"]["samples"] == 4
    assert any("rho_reference" in row for row in record["scaler_trace"])
    assert record["training"]["aep"]["val_ce"] == first["training"]["aep"]["val_ce"]
    exact = record["exact_streaming"]
    assert exact["max_rel_error_mean_vs_autograd"] < 1e-12
    assert exact["max_rel_error_variance_vs_dense"] < 1e-12
    assert str(out.resolve()) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--steps", "0"], "--steps must be >= 1"),
        (["demo", "--micro-batches", "3"], "--batch-size=16 must be divisible by --micro"),
        (["bench", "no-such-suite", "--smoke"], "unknown benchmark 'no-such-suite'"),
        (["bench", "--dir", "/nonexistent/benchmarks"], "no benchmark folder"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert "\n" not in err


@pytest.mark.parametrize(
    ("args", "usage", "hint"),
    [
        (["demo", "--stpes", "3"], "usage: gradstats demo ", "(did you mean --steps?)"),
        (["eqprop", "train", "--stpes", "3"], "usage: gradstats eqprop train ",
         "unrecognized arguments: --stpes 3 (did you mean --steps?)"),
        (["eqprop", "probe", "RUN", "--metods", "aep"], "usage: gradstats eqprop probe ",
         "(did you mean --methods?)"),
        (["fisher", "gpt2", "--seq-lenn", "8"], "usage: gradstats fisher ",
         "(did you mean --seq-len?)"),
        (["bench", "--smokee"], "usage: gradstats bench ", "(did you mean --smoke?)"),
        (["eqprop", "trian"], "usage: gradstats eqprop ", "did you mean 'train'?"),
        (["demoo"], "usage: gradstats ", "did you mean 'demo'?"),
        (["fisher", "gpt2", "--kind", "empiricl"], "usage: gradstats fisher ",
         "did you mean 'empirical'?"),
    ],
)  # fmt: skip
def test_a_typo_prints_the_commands_usage_with_a_suggestion(args, usage, hint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage)
    assert hint in err.strip().splitlines()[-1]
    if args[0] != "demoo":  # a subcommand's typo: not the top-level usage
        assert "[--version] COMMAND" not in err


def test_bench_lists_suites(capsys):
    assert main(["bench", "--list"]) == 0
    assert "moments" in capsys.readouterr().out
