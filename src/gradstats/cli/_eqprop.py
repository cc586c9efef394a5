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

Both check ``--out`` (and ``train`` its ``--device``; with ``--resume`` the trainer reads and
checks the whole checkpoint) before any compute. ``train --resume`` refuses any option typed on
the command line — equal to its default or not — that differs from the run's own (the parser's
defaults are sentinels, so a typed option is told from an untyped one); only the resumable ones
(``--steps``, ``--out``, ``--progress``, ``--threads``, ``--device``, ``--timeout``) may change.
Ctrl-C during ``train`` finishes the current step, saves a checkpoint at it and prints one line
naming ``--resume`` (exit status 130). Under ``torchrun``, ``--timeout SECONDS`` bounds how long
a process waits for the others: a rank that stops answering fails the run with one line instead
of blocking it forever.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from gradstats.cli._checks import check_out_dir, resolve_device
from gradstats.cli._config import add_config_arguments, config_from_args
from gradstats.cli._eqprop_probe import ProbeConfig, run_probe
from gradstats.cli._eqprop_sample import register_sample
from gradstats.errors import GradstatsError

__all__ = ["ProbeConfig", "register", "run_probe"]

INTERRUPTED = 130


class _Default:
    """A parser default standing for an option that was not typed (``--help`` shows the
    value)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return repr(self.value)


def _mark_defaults(parser: argparse.ArgumentParser, config: type) -> None:
    """Wrap the defaults of ``config``'s options in :class:`_Default` sentinels."""
    names = {f.name for f in dataclasses.fields(config)}
    for action in parser._actions:
        wrapped = isinstance(action.default, _Default) or action.default is argparse.SUPPRESS
        if action.dest in names and not wrapped:
            action.default = _Default(action.default)


def _given(config: type, args: argparse.Namespace) -> tuple[argparse.Namespace, frozenset[str]]:
    """The namespace with the sentinels unwrapped, and the names of the typed options."""
    values = dict(vars(args))
    typed = set()
    for field in dataclasses.fields(config):
        value = values.get(field.name)
        if isinstance(value, _Default):
            values[field.name] = value.value
        else:
            typed.add(field.name)
    return argparse.Namespace(**values), frozenset(typed)


_GROUP_FAILURES = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


def _group_failure(error: RuntimeError, message: str) -> bool:
    """Whether ``error`` is a failed collective (nccl: a DistError; gloo: a RuntimeError whose
    message says the peer timed out or went away)."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    return any(key in message.lower() for key in _GROUP_FAILURES)


def _train(args: argparse.Namespace) -> int:
    from gradstats.eqprop.train import TrainConfig, train
    from gradstats.eqprop.train._distributed import process_group_from_env
    from gradstats.eqprop.train._runtime import TrainingInterrupted

    namespace, typed = _given(TrainConfig, args)
    config = config_from_args(TrainConfig, namespace)
    resolve_device(config.device)
    check_out_dir(config.out)
    distributed = False
    try:
        with process_group_from_env(config.device, config.timeout) as group:
            distributed = group.active
            result = train(config, explicit=typed)  # a divergence is a DivergenceError
    except TrainingInterrupted as stop:  # the checkpoint holds the last finished step
        print(f"gradstats eqprop train: {stop}", file=sys.stderr)
        return INTERRUPTED
    except RuntimeError as error:  # a collective failed: a rank timed out or exited
        first = " ".join(str(error).split())[:200] or type(error).__name__
        if not (distributed and _group_failure(error, first)):
            raise
        limit = config.timeout if config.timeout is not None else 1800
        raise GradstatsError(
            f"the process group failed: another process stopped answering within --timeout "
            f"{limit:g} s or exited ({first})"
        ) from None
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
    _mark_defaults(train, TrainConfig)
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
    register_sample(sub)
