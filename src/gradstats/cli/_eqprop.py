"""``gradstats eqprop train`` and ``gradstats eqprop probe``: the equilibrium transformer LM.

* ``train``: options from :class:`gradstats.eqprop.train.TrainConfig`; writes ``checkpoint.pt``,
  ``metrics.jsonl`` and ``curves.png`` into ``--out``; ``--resume`` continues bitwise.
  Under ``torchrun --nproc_per_node N --no-python gradstats eqprop train ...`` (``WORLD_SIZE``
  > 1) it joins the process group from the environment (nccl on CUDA, gloo on CPU), trains
  data-parallel with ``--batch-size`` per process, and leaves the group at the end.
* ``probe RUN`` (:mod:`gradstats.cli._eqprop_probe`): loads the run's checkpoint and its saved
  configuration (explicit overrides are echoed), compares every estimator with the exact
  implicit gradient per parameter group, sweeps T2, β/r and N, runs ``diagnose()`` and writes
  ``probe.json``, ``probe.csv`` and ``probe.png``. The run's ``beta`` is a real nudge β for an
  aep/ep_symmetric run and the radius r for a holomorphic run: it is used only for the probed
  methods of that kind (the others use the model's per-method default); ``--beta`` overrides
  the real nudges, ``--r`` the radius. The β/r each method used is printed and stored in
  ``probe.json`` (``beta_used``).

Both check ``--out`` (and ``train`` its ``--device`` and, with ``--resume``, the checkpoint's
keys) before any compute.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradstats.cli._checks import check_out_dir, resolve_device
from gradstats.cli._config import add_config_arguments, config_from_args
from gradstats.cli._eqprop_probe import ProbeConfig, run_probe

__all__ = ["ProbeConfig", "register", "run_probe"]


def _train(args: argparse.Namespace) -> int:
    from gradstats.eqprop.train import TrainConfig, train
    from gradstats.eqprop.train._checkpoint import RESUME_KEYS, load_checkpoint
    from gradstats.eqprop.train._distributed import process_group_from_env

    config = config_from_args(TrainConfig, args)
    resolve_device(config.device)
    check_out_dir(config.out)
    if config.resume:  # a checkpoint that cannot be resumed fails here, naming what it lacks
        load_checkpoint(config.out, require=RESUME_KEYS)
    with process_group_from_env(config.device) as group:
        result = train(config)  # a divergence is a DivergenceError: one line, exit 2
    if not group.main:
        return 0
    val = "n/a" if result.val_ce is None else f"{result.val_ce:.4f}"
    print(
        f"step {result.step}: val CE {val}, {result.skipped_steps} skipped steps, "
        f"{100 * result.unconverged_fraction:.2f}% unconverged phases; run folder "
        f"{Path(config.out).resolve()}"
    )
    return 0


def _probe(args: argparse.Namespace) -> int:
    run_probe(config_from_args(ProbeConfig, args))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    from gradstats.eqprop.train import TrainConfig

    parser = commands.add_parser(
        "eqprop",
        help="train and probe the equilibrium transformer language model",
        description="Equilibrium propagation on a transformer language model.",
    )
    sub = parser.add_subparsers(dest="eqprop_command", metavar="SUBCOMMAND", required=True)
    train = sub.add_parser(
        "train",
        help="train the equilibrium transformer (or the backprop baseline)",
        description=(
            "Train on character-level Shakespeare (embedded) or --data FILE with an EP-family "
            "estimator, BPTT, or (--method backprop) the feed-forward baseline. Writes "
            "checkpoint.pt, metrics.jsonl and curves.png into --out. Data-parallel on N "
            "processes: 'torchrun --nproc_per_node N --no-python gradstats eqprop train ...' "
            "(gloo on CPU, nccl with --device cuda: each rank uses cuda:LOCAL_RANK). There "
            "--batch-size is per process: the global batch is N x batch-size windows, each "
            "process estimates on its share, the gradients are all-reduced (summed, divided by "
            "the global batch's tokens), and every process takes the same step as one process "
            "with --batch-size N x batch-size would. Only rank 0 writes --out; --resume needs "
            "the same N."
        ),
    )
    add_config_arguments(train, TrainConfig)
    train.set_defaults(run=_train)
    probe = sub.add_parser(
        "probe",
        help="compare every estimator with the exact gradient on a trained run",
        description=(
            "Load RUN's checkpoint and configuration, compare estimators with the implicit "
            "gradient per parameter group, sweep T2, beta/r and N, and diagnose what limits them."
        ),
    )
    add_config_arguments(probe, ProbeConfig)
    probe.set_defaults(run=_probe)
