"""``gradstats demo``: the three pillars on one tiny language model, in about three minutes.

On the embedded character-level Shakespeare corpus it

1. trains a tiny equilibrium transformer twice from the same initialisation and batches — with
   AEP (no backpropagation through the relaxation) and with BPTT — in two processes;
2. probes the AEP-trained model: every estimator against the exact implicit gradient, per
   parameter group, with T2 / r / N sweeps and ``diagnose()`` (``gradstats eqprop probe``);
3. collects the per-head empirical Fisher of the AEP-trained model (``gradstats fisher``);
4. runs the variance gradient scaler's noise trace on the backprop baseline: same-point and
   temporal ρ beside a reference ρ from many per-sequence gradients at the same parameters;
5. re-checks the streaming-moments core against its float64 references.

It writes ``report.md`` (with ``curves.png``, ``probe/probe.png``, ``fisher/heads_heatmap.png``
and ``scaler_trace.png``) and ``demo.json`` into ``--out`` and prints the folder at the end.
Run it again with the same ``--out`` and it replaces its previous output there (a non-empty
folder that is not a demo's output is refused).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from gradstats.cli._checks import check_out_dir
from gradstats.cli._config import add_config_arguments, config_from_args, option
from gradstats.cli._demo_sections import exact_streaming, plot_scaler_trace, scaler_trace
from gradstats.errors import ConfigurationError

__all__ = ["MARKER", "DemoConfig", "prepare_out", "register", "run_demo"]

_METHODS = ("aep", "bptt")


@dataclass(frozen=True)
class DemoConfig:
    out: Path = option(Path("gradstats-demo"), "output folder for the report and plots")
    seed: int = option(0, "seed of the initialisation, the batches and the probes")
    steps: int = option(250, "training steps of each equilibrium run (AEP and BPTT)")
    d_model: int = option(32, "state width of the tiny transformer")
    n_heads: int = option(4, "attention heads")
    block_size: int = option(32, "characters per window")
    batch_size: int = option(16, "windows per step")
    t1: int = option(30, "free-phase step cap (BPTT: unrolled steps)")
    probe_batch: int = option(4, "validation windows in the probe batch")
    fisher_sequences: int = option(64, "validation windows the Fisher is collected on")
    scaler_steps: int = option(150, "steps of the scaler's noise trace")
    micro_batches: int = option(4, "micro-batches per step in the noise trace (same-point)")
    reference_sequences: int = option(
        128, "per-sequence gradients behind each reference ρ of the noise trace"
    )
    workers: int = option(2, "processes for the two training runs (1: one after the other)")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        for name in (
            "steps", "d_model", "n_heads", "block_size", "batch_size", "t1", "probe_batch",
            "fisher_sequences", "scaler_steps", "micro_batches", "reference_sequences", "workers",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigurationError(f"{flag} must be >= 1; got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigurationError(f"--d-model={self.d_model} must be divisible by --n-heads")
        if self.batch_size % self.micro_batches:
            raise ConfigurationError(
                f"--batch-size={self.batch_size} must be divisible by "
                f"--micro-batches={self.micro_batches}"
            )


def _train_config(config: DemoConfig, method: str, progress: bool):
    from gradstats.eqprop.train import TrainConfig

    return TrainConfig(
        method=method,
        steps=config.steps,
        out=config.out / method,
        d_model=config.d_model,
        n_heads=config.n_heads,
        block_size=config.block_size,
        batch_size=config.batch_size,
        t1=config.t1,
        beta=0.05 if method == "aep" else None,
        tol_adjoint=1e-3 if method == "aep" else None,
        jac_penalty=0.0 if method == "backprop" else 0.1,  # the README's "small" stabilisers
        res_penalty=0.0 if method == "backprop" else 1.0,
        warmup=max(1, config.steps // 5),
        eval_every=max(1, config.steps // 5),
        spot_check_every=max(1, config.steps // 2),
        checkpoint_every=config.steps,
        seed=config.seed,
        threads=1,
        progress=progress,
    )


def _train_one(train_config):
    from gradstats.eqprop.train import train

    start = time.perf_counter()
    result = train(train_config)
    return result, time.perf_counter() - start


def _train_both(config: DemoConfig) -> dict[str, dict]:
    """AEP and BPTT from the same initialisation and batches (two processes by default)."""
    configs = [_train_config(config, m, config.progress and i == 0) for i, m in enumerate(_METHODS)]
    if config.workers == 1:
        results = [_train_one(c) for c in configs]
    else:
        print(f"training {' and '.join(_METHODS)} in {min(config.workers, 2)} processes ...")
        with ProcessPoolExecutor(min(config.workers, 2), mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_train_one, configs))
    from gradstats.eqprop.train import read_metrics

    runs = {}
    for method, (result, seconds) in zip(_METHODS, results, strict=True):
        records = read_metrics(result.metrics)
        spot = [r for r in records if "cos_implicit_min" in r]
        runs[method] = {
            "val_ce": result.val_ce,
            "seconds": seconds,
            "unconverged_fraction": result.unconverged_fraction,
            "skipped_steps": result.skipped_steps,
            "cos_implicit_min": spot[-1]["cos_implicit_min"] if spot else None,
            "records": records,
        }
    return runs


def _probe(config: DemoConfig) -> dict[str, Any]:
    """``gradstats eqprop probe`` of the AEP run (its errors reach the CLI as they are)."""
    from gradstats.cli._eqprop_probe import ProbeConfig, run_probe

    out = config.out / "probe"
    probe_config = ProbeConfig(
        path=config.out / "aep",
        out=out,
        methods=("aep", "holomorphic"),
        batch_size=config.probe_batch,
        seed=config.seed,
        t2_sweep=(10, 20, 40),
        points_sweep=(2, 4, 6),
    )
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        run_probe(probe_config)
    record = json.loads((out / "probe.json").read_text())
    worst: dict[str, float] = {}
    for row in record["rows"]:
        if row["sweep"] is None and row["group"] != "all":
            worst[row["method"]] = min(worst.get(row["method"], 1.0), row["cos"])
    return {"min_cos": worst, "diagnose": record["diagnose"], "text": buffer.getvalue()}


def _fisher(config: DemoConfig, corpus) -> dict:
    from gradstats.cli._fisher import FisherConfig, run_fisher

    out = config.out / "fisher"
    out.mkdir(parents=True, exist_ok=True)
    text_file = out / "val_text.txt"
    text_file.write_text(corpus.decode(corpus.val[: config.fisher_sequences * config.block_size]))
    batch = min(8, config.fisher_sequences)
    fisher_config = FisherConfig(
        source=str(config.out / "aep"),
        text=text_file,
        out=out,
        seq_len=config.block_size,
        batch_size=batch,
        max_batches=-(-config.fisher_sequences // batch),
        top=8,
        progress=config.progress,
    )
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), _quiet_warnings():
        run_fisher(fisher_config)
    return {"summary": json.loads((out / "summary.json").read_text()), "text": buffer.getvalue()}


def _quiet_warnings():
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message=".*per-sample.*|.*torch.func.*")
    return stack


def _scaler(config: DemoConfig, corpus) -> list[dict]:
    base = _train_config(config, "backprop", False)
    return scaler_trace(
        corpus,
        lambda: base.build_model(corpus.vocab_size),
        steps=config.scaler_steps,
        batch_size=config.batch_size,
        block_size=config.block_size,
        micro_batches=config.micro_batches,
        lr=base.lr,
        beta=0.9,
        trace_every=max(1, config.scaler_steps // 10),
        reference_sequences=config.reference_sequences,
        seed=config.seed,
        progress=config.progress,
    )


MARKER = ".gradstats-demo"  # written first into --out: the folder is a demo's output
_OUTPUTS = (MARKER, "aep", "bptt", "probe", "fisher", "curves.png", "scaler_trace.png",
            "report.md", "demo.json")  # fmt: skip


def prepare_out(out: Path) -> None:
    """Make ``out`` ready for a demo run, before any compute.

    A new or empty folder is used as it is. A previous demo's output (it holds the marker
    ``.gradstats-demo``, or ``demo.json`` from before the marker) is replaced: the demo's own
    entries (:data:`_OUTPUTS`) are removed, anything else in the folder is kept. Any other
    non-empty folder is refused, so that a mistyped ``--out`` never loses a user's files.

    Raises:
        ConfigurationError: ``out`` is not empty and is not a demo's output.
    """
    check_out_dir(out)
    if out.is_dir() and any(out.iterdir()):
        if not ((out / MARKER).is_file() or (out / "demo.json").is_file()):
            raise ConfigurationError(
                f"--out {out} is not empty and is not the output of an earlier gradstats demo: "
                "choose a new or empty folder"
            )
        for name in _OUTPUTS:
            entry = out / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by 'gradstats demo': a later run replaces this folder\n")


def run_demo(config: DemoConfig) -> Path:
    """Run every part, write ``report.md``, ``demo.json`` and the plots; return the folder.

    ``config.out`` is prepared first (:func:`prepare_out`): running the demo again with the same
    folder replaces its previous output.
    """
    from gradstats.cli._demo_report import write_report
    from gradstats.data import load_corpus
    from gradstats.eqprop.train import plot_curves

    corpus = load_corpus(None)
    corpus.check_block_size(config.block_size)
    prepare_out(config.out)
    timings = {}
    start = time.perf_counter()
    runs = _train_both(config)
    plot_curves({m: r["records"] for m, r in runs.items()}, config.out / "curves.png", "demo")
    timings["training"] = time.perf_counter() - start
    results: dict[str, Any] = {"runs": runs}
    parts: tuple[tuple[str, Callable[[], object]], ...] = (
        ("probe", lambda: _probe(config)),
        ("fisher", lambda: _fisher(config, corpus)),
        ("scaler", lambda: _scaler(config, corpus)),
        ("moments", lambda: exact_streaming(config.seed)),
    )
    for name, part in parts:
        start = time.perf_counter()
        results[name] = part()
        timings[name] = time.perf_counter() - start
    results["timings"] = timings
    plot_scaler_trace(results["scaler"], config.out / "scaler_trace.png")
    write_report(config, results)
    return config.out


def run(args: argparse.Namespace) -> int:
    out = run_demo(config_from_args(DemoConfig, args))
    print(f"\nDemo report written to {out.resolve()}/report.md")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="a three-minute tour: EP vs BPTT training, probe, Fisher, scaler noise trace",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, DemoConfig)
    parser.set_defaults(run=run)
