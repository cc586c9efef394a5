"""Does equilibrium training keep improving? AEP vs BPTT vs backprop over 2,000 steps.

The README's "small" configuration (d_model 64, 4 heads, block 64, batch 16, T1 = 60, one CPU
thread each, seed 0) run for 2,000 steps — the default cosine schedule, lr 3e-3 — instead of 600:

* ``aep``: asymmetric EP (β = 0.05, ``--tol-adjoint 1e-3``) with the adaptive stabiliser
  (``--contraction-target``, initial ``--jac-penalty 0.1 --res-penalty 1.0``);
* ``bptt``: BPTT through the same block with the same controller (the same objective family);
* ``backprop``: the block as a standard feed-forward transformer layer;
* ``backprop_thin``: the same with FFN multiple 1 (the thin baseline);
* ``aep_fixed``: AEP with the fixed weights of the 600-step table (no controller), for reference;
* ``aep_small_beta``: ``aep`` with β = 0.002 (at the weights where β = 0.05 made the nudged
  phase diverge, β = 0.002 converges);
* ``aep_jac``, ``bptt_jac``: the Jacobian penalty alone at its fixed weight 0.1 — no residual
  penalty (at a converged state relative scaling blew its vanishing gradient up to the task
  gradient's norm; see ``gradstats.eqprop._penalties``), no controller; AEP at β = 0.002.
  Their table alone: ``--only aep_jac,bptt_jac,backprop,backprop_thin --bptt bptt_jac``.
* ``aep_spec``, ``bptt_spec``: the controller (target 0.2) on the *spectral* Jacobian penalty
  ½σ_max(I + εJ)² (``--jac-norm spectral``, 3 power-iteration steps), no residual penalty: the
  Frobenius norm pushes every singular value of the block's Jacobian towards zero, while a
  contraction needs only the largest below 1. ``--only aep_spec,bptt_spec,backprop --bptt
  bptt_spec``.
* ``aep_bound``, ``bptt_bound``: a Lipschitz bound instead of a penalty on the whole norm: only
  ½ max(0, σ_max² − 0.5²) per sample (``--jac-bound 0.5``), at the fixed weight 0.3 — no push
  at all while the map contracts at rate ≤ 0.5 (relative scaling gives any active penalty the
  push w·‖g_task‖, however small the penalty already is). ``--only
  aep_bound,bptt_bound,backprop --bptt bptt_bound``. ``aep_bound1``: the same with the bound 1.0.
* ``bptt_t1``, ``bptt_t2``, ``bptt_t4``: BPTT through only 1, 2 and 4 relaxation steps, no
  penalty — one pass of the block, or a weight-tied 2- or 4-layer network, far from its fixed
  point: what the same block computes when it need not be an equilibrium.
* ``aep_layered``, ``bptt_layered``: the layered block (``--attn-mode layered --damping 0``, one
  sub-state per sub-layer, coupled forward), no stabiliser: its fixed point is the backprop
  layer, reached in 2 steps (BPTT through ``--t1 2`` is then exact). ``--only
  aep_layered,bptt_layered,backprop --bptt bptt_layered``.
* ``aep_layered_fb``, ``bptt_layered_fb``: the same with ``--feedback 0.5`` (attention reads
  (x_in + h)/2) at the default damping 1: a genuine equilibrium, no stabiliser.
* ``aep_layered_loop``, ``bptt_layered_loop``: the same with the controller (target 0.3) on the
  *loop* Jacobian penalty ½‖(I + εJ)²‖²_F (``--jac-norm loop``): the squared Jacobian of the
  layered map is the loop gain around the feedback (through both sub-layers), zero without
  feedback, so the penalty does not act on the feed-forward path as such. ``--only
  aep_layered_loop,bptt_layered_loop,backprop --bptt bptt_layered_loop``.
  ``aep_layered_loop6``: the same at the looser target 0.6; ``bptt_layered_damped``: no feedback
  at damping 1 (the feedback runs' damping), through the two steps that reach its fixed point.
* ``aep_layered_fb01``, ``aep_layered_loop_fb01``: weak feedback 0.1, without a stabiliser and
  with the loop controller (target 0.3).

``--res-penalty`` and ``--contraction-target`` replace those values in the controlled runs.
The README's runs without a residual penalty: ``--runs runs/noplateau_jac --res-penalty 0
--only aep_small_beta,bptt,aep_jac,bptt_jac,backprop,backprop_thin``; its first, abandoned try
added ``--contraction-target 0.5``.

It prints the table of validation CE at steps 500, 1000, 1500 and the end, the ratio to BPTT, the
gap to backprop and each run's CPU minutes, and draws ``curves.png`` (and, with ``--figure``, a
copy such as ``docs/figures/eqprop_no_plateau.png``). Runs already complete in ``--runs`` are
reused. Two run at a time, in the order above (``aep`` and ``bptt`` first).

Run: ``nice -n 15 python examples/eqprop_no_plateau.py --runs runs/noplateau`` (about 2 hours
on 2 cores; ``--dry-run`` prints the command lines). The second seed of the README:
``--runs runs/noplateau_seed1 --seed 1 --only aep_small_beta,bptt,backprop,backprop_thin``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STEPS = 2000
CHECKPOINTS = (500, 1000, 1500)
COMMON = ["--steps", str(STEPS), "--batch-size", "16", "--block-size", "64", "--t1", "60",
          "--eval-batches", "8", "--threads", "1", "--no-progress", "--seed", "0"]  # fmt: skip
STABILISERS = ["--jac-penalty", "0.1", "--res-penalty", "1.0"]
ADAPTIVE = [*STABILISERS, "--contraction-target", "0.2", "--controller-gain", "0.3"]
JACOBIAN = ["--jac-penalty", "0.1"]
# the controller on the spectral norm of the map's Jacobian (only its slowest mode), no residual
SPECTRAL = ["--jac-penalty", "0.1", "--jac-norm", "spectral", "--contraction-target", "0.2",
            "--controller-gain", "0.3"]  # fmt: skip
NUDGE = ["--beta", "0.05", "--tol-adjoint", "1e-3"]
# a Lipschitz bound: only the excess of σ_max(I + εJ) over 0.5 is penalised, fixed weight
BOUND = ["--jac-penalty", "0.3", "--jac-norm", "spectral", "--jac-bound", "0.5"]
LAYERED = ["--attn-mode", "layered", "--damping", "0"]
FEEDBACK = ["--attn-mode", "layered", "--feedback", "0.5"]  # the default damping 1
LOOP = ["--jac-penalty", "0.1", "--jac-norm", "loop", "--contraction-target", "0.3",
        "--controller-gain", "0.3"]  # fmt: skip
RUNS = {
    "aep": ["--method", "aep", *ADAPTIVE, "--beta", "0.05", "--tol-adjoint", "1e-3"],
    "bptt": ["--method", "bptt", *ADAPTIVE],
    "backprop": ["--method", "backprop"],
    "backprop_thin": ["--method", "backprop", "--ffn-mult", "1"],
    "aep_fixed": ["--method", "aep", *STABILISERS, "--beta", "0.05", "--tol-adjoint", "1e-3"],
    "aep_small_beta": ["--method", "aep", *ADAPTIVE, "--beta", "0.002", "--tol-adjoint", "1e-3"],
    # the Jacobian penalty alone, fixed (no residual penalty, no controller)
    "aep_jac": ["--method", "aep", *JACOBIAN, "--beta", "0.002", "--tol-adjoint", "1e-3"],
    "bptt_jac": ["--method", "bptt", *JACOBIAN],
    "aep_spec": ["--method", "aep", *SPECTRAL, "--beta", "0.002", "--tol-adjoint", "1e-3"],
    "bptt_spec": ["--method", "bptt", *SPECTRAL],
    "aep_bound": ["--method", "aep", *BOUND, "--beta", "0.002", "--tol-adjoint", "1e-3"],
    "bptt_bound": ["--method", "bptt", *BOUND],
    "aep_bound1": [
        "--method",
        "aep",
        *BOUND[:-1],
        "1.0",
        "--beta",
        "0.002",
        "--tol-adjoint",
        "1e-3",
    ],
    # the block applied 1, 2 and 4 times from z0 = x_in/(1 + c), no penalty: not an equilibrium
    "bptt_t1": ["--method", "bptt", "--t1", "1"],
    "bptt_t2": ["--method", "bptt", "--t1", "2"],
    "bptt_t4": ["--method", "bptt", "--t1", "4"],
    # the layered block (one sub-state per sub-layer, forward coupling; damping 0): at feedback 0
    # its fixed point is the backprop baseline's layer, reached in 2 steps; no stabiliser
    "aep_layered": ["--method", "aep", *LAYERED, "--beta", "0.05", "--tol-adjoint", "1e-3"],
    "bptt_layered": ["--method", "bptt", *LAYERED, "--t1", "2"],
    # feedback 0.5: attention reads (x_in + h)/2, the block's output fed back: an equilibrium;
    # damping 1 (its map z <- Phi(z)/2; at damping 0 the free phase stopped converging by step 36)
    "aep_layered_fb": [
        "--method",
        "aep",
        *FEEDBACK,
        "--beta",
        "0.05",
        "--tol-adjoint",
        "1e-3",
    ],
    "bptt_layered_fb": ["--method", "bptt", *FEEDBACK],
    # the same, stabilised: the controller on the loop gain, 1/2||(I + eps J)^2||_F^2 (zero
    # without feedback: the feed-forward part of the layered map's Jacobian is nilpotent)
    "aep_layered_loop": ["--method", "aep", *FEEDBACK, *LOOP, *NUDGE],
    "bptt_layered_loop": ["--method", "bptt", *FEEDBACK, *LOOP],
    # controls: the loop controller at a looser target; no feedback at the feedback runs'
    # damping 1 (BPTT through the 2 steps that reach the fixed point: exact)
    "aep_layered_loop6": ["--method", "aep", *FEEDBACK, *LOOP[:5], "0.6", *LOOP[6:], *NUDGE],
    "bptt_layered_damped": ["--method", "bptt", "--attn-mode", "layered", "--t1", "2"],
    # weak feedback 0.1: without a stabiliser, and with the loop controller (target 0.3)
    "aep_layered_fb01": ["--method", "aep", *FEEDBACK[:3], "0.1", *NUDGE],
    "aep_layered_loop_fb01": ["--method", "aep", *FEEDBACK[:3], "0.1", *LOOP, *NUDGE],
}


def command(
    name: str,
    runs: Path,
    seed: int = 0,
    res_penalty: float | None = None,
    target: float | None = None,
) -> list[str]:
    """The ``gradstats eqprop train`` command line of run ``name`` (with ``seed``; a
    ``res_penalty`` or contraction ``target`` replaces the value in :data:`RUNS`)."""
    common = list(COMMON)
    common[common.index("--seed") + 1] = str(seed)
    line = list(RUNS[name])
    if "--t1" in line:  # the run's own step count replaces the common T1
        del common[common.index("--t1") : common.index("--t1") + 2]
    for option, value in (("--res-penalty", res_penalty), ("--contraction-target", target)):
        if value is not None and option in line:
            line[line.index(option) + 1] = f"{value:g}"
    return [sys.executable, "-m", "gradstats", "eqprop", "train", *common, *line,
            "--out", str(runs / name)]  # fmt: skip


def _done(out: Path) -> bool:
    """Complete, or stopped (a diverged run keeps its folder and ``cpu.json``): not rerun."""
    from gradstats.eqprop.train import read_metrics

    metrics = out / "metrics.jsonl"
    if (out / "cpu.json").exists() and metrics.exists():
        return True
    return metrics.exists() and any(r.get("step") == STEPS for r in read_metrics(metrics))


def _run(name: str, runs: Path, seed: int = 0, **options: float | None) -> None:
    """Run ``name`` unless done; its CPU seconds (user + system) and exit status go to
    ``cpu.json``. A run that stopped with metrics (training diverged: exit status 2) is
    reported in the table; one that left nothing raises."""
    if _done(runs / name):
        return
    line = command(name, runs, seed, **options)
    print(" ".join(line), flush=True)
    proc = subprocess.Popen(line)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and not (runs / name / "metrics.jsonl").exists():
        raise subprocess.CalledProcessError(code, line)
    cpu = {"cpu_seconds": usage.ru_utime + usage.ru_stime, "returncode": code}
    (runs / name / "cpu.json").write_text(json.dumps(cpu) + "\n")


def _cpu_minutes(out: Path, records: list[dict]) -> str:
    """CPU minutes from ``cpu.json``, else the run's wall-clock ``time`` (marked ``wall``)."""
    path = out / "cpu.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    if "cpu_seconds" in info:
        return f"{float(info['cpu_seconds']) / 60:.1f}"
    return f"{float(records[-1]['time']) / 60:.1f} (wall)"


def table(
    runs: Path, names: tuple[str, ...] = tuple(RUNS), reference: str = "bptt"
) -> tuple[list[list[object]], dict[str, float]]:
    """The rows of the README table and each run's final validation CE (of ``names``, which
    include the BPTT run ``reference`` and ``backprop``: the ratio and the gap are to them)."""
    from gradstats.eqprop.train import read_metrics

    rows: list[list[object]] = []
    final: dict[str, float] = {}
    for name in names:
        records = read_metrics(runs / name / "metrics.jsonl")
        val = {r["step"]: r["val_ce"] for r in records if "val_ce" in r}
        final[name] = val[max(val)]
        at = [f"{val[s]:.3f}" if s in val else "-" for s in CHECKPOINTS]
        last = max(r["step"] for r in records if "step" in r)
        end = f"{final[name]:.3f}" + ("" if last == STEPS else f" @{max(val)}, stopped at {last}")
        rows.append([name, *at, end, _cpu_minutes(runs / name, records)])
    for row, name in zip(rows, names, strict=True):
        row[-1:-1] = [f"{final[name] / final[reference]:.3f}",
                      f"{final[name] - final['backprop']:+.3f}"]  # fmt: skip
    return rows, final


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/noplateau"), help="run folders")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--figure", type=Path, help="also copy curves.png here")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run")
    parser.add_argument(
        "--res-penalty", type=float, help="residual-penalty weight of the stabilised runs"
    )
    parser.add_argument(
        "--contraction-target", type=float, help="controller target of the controlled runs"
    )
    parser.add_argument(
        "--only", default=",".join(RUNS), help="comma-separated runs (--bptt and backprop needed)"
    )
    parser.add_argument("--bptt", default="bptt", help="the BPTT run the ratios are to")
    args = parser.parse_args(argv)
    names = tuple(n for n in args.only.split(",") if n)
    unknown = sorted(set(names) - set(RUNS))
    if unknown or not {args.bptt, "backprop"} <= set(names):
        parser.error(f"--only: runs from {', '.join(RUNS)}, {args.bptt} and backprop included")
    options = {"res_penalty": args.res_penalty, "target": args.contraction_target}
    if args.dry_run:
        for name in names:
            print(" ".join(command(name, args.runs, args.seed, **options)))
        return {}
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda name: _run(name, args.runs, args.seed, **options), names))
    from gradstats._format import format_table
    from gradstats.eqprop.train import plot_curves, read_metrics

    rows, final = table(args.runs, names, args.bptt)
    head = ["run", *(f"val CE @{s}" for s in CHECKPOINTS), "final", f"÷ {args.bptt}", "− backprop",
            "CPU min"]  # fmt: skip
    print(format_table(rows, head, markdown=True))
    records = {name: read_metrics(args.runs / name / "metrics.jsonl") for name in names}
    curves = plot_curves(records, args.runs / "curves.png", f"no plateau? {STEPS} steps")
    if args.figure is not None:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(curves, args.figure)
    print(f"curves: {args.figure or curves}")
    return final


if __name__ == "__main__":
    main()
