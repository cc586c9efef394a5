"""The README's "small" configuration: AEP vs BPTT vs the backprop transformer, same step budget.

Six runs of ``gradstats eqprop train`` (d_model 64, 4 heads, block 64, batch 16, 600 steps,
T1 = 60, one CPU thread each), two at a time:

* ``aep`` and ``bptt`` with the stabilisers ``--jac-penalty 0.1 --res-penalty 1.0`` (the same
  objective, so their validation cross-entropies compare the estimators);
* ``bptt_free``: BPTT without stabilisers (an unrolled network that need not reach a fixed point);
* ``backprop``: the same block as a standard feed-forward transformer layer;
* ``aep_jac`` and ``bptt_jac``: the Jacobian penalty alone (``--jac-penalty 0.1``, no residual
  penalty).

The residual penalty is a hinge at the free phase's tolerance since the 2026-12-02 change (see
``gradstats.eqprop.add_penalties``); the README's ``aep``/``bptt`` rows were measured before it,
when relative scaling blew its vanishing gradient up to the task gradient's norm.

Then it prints the table of final validation CE (and the AEP / BPTT ratio) and writes
``curves.png`` with every run's curves. Runs already complete in ``--runs`` are reused.

Run: ``python examples/eqprop_small_config.py --runs runs/small`` (about 50 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

COMMON = ["--steps", "600", "--batch-size", "16", "--block-size", "64", "--t1", "60",
          "--eval-batches", "8", "--threads", "1", "--no-progress"]  # fmt: skip
STABILISERS = ["--jac-penalty", "0.1", "--res-penalty", "1.0"]
JACOBIAN = ["--jac-penalty", "0.1"]
RUNS = {
    "aep": ["--method", "aep", *STABILISERS, "--beta", "0.05", "--tol-adjoint", "1e-3"],
    "bptt": ["--method", "bptt", *STABILISERS],
    "backprop": ["--method", "backprop"],
    "bptt_free": ["--method", "bptt"],
    "aep_jac": ["--method", "aep", *JACOBIAN, "--beta", "0.05", "--tol-adjoint", "1e-3"],
    "bptt_jac": ["--method", "bptt", *JACOBIAN],
}


def command(name: str, runs: Path) -> list[str]:
    """The ``gradstats eqprop train`` command line of run ``name``."""
    return [sys.executable, "-m", "gradstats", "eqprop", "train", *COMMON, *RUNS[name],
            "--out", str(runs / name)]  # fmt: skip


def _run(name: str, runs: Path) -> None:
    from gradstats.eqprop.train import read_metrics

    metrics = runs / name / "metrics.jsonl"
    if metrics.exists() and any(r.get("step") == 600 for r in read_metrics(metrics)):
        return
    print(" ".join(command(name, runs)), flush=True)
    subprocess.run(command(name, runs), check=True)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/small"), help="run folders")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    args = parser.parse_args(argv)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda name: _run(name, args.runs), RUNS))
    from gradstats._format import format_table
    from gradstats.eqprop.train import plot_curves, read_metrics

    records = {name: read_metrics(args.runs / name / "metrics.jsonl") for name in RUNS}
    val = {n: [r["val_ce"] for r in recs if "val_ce" in r][-1] for n, recs in records.items()}
    minutes = {n: recs[-1]["time"] / 60 for n, recs in records.items()}
    rows = [[n, val[n], f"{val[n] / val['bptt']:.3f}", f"{minutes[n]:.1f}"] for n in RUNS]
    print(format_table(rows, ["run", "val CE", "÷ bptt", "minutes"], markdown=True))
    plot_curves(records, args.runs / "curves.png", "small configuration, 600 steps")
    print(f"curves: {args.runs / 'curves.png'}")
    return val


if __name__ == "__main__":
    main()
