"""``gradstats eqprop train`` and ``gradstats eqprop probe``: the equilibrium transformer LM.

* ``train``: options from :class:`gradstats.eqprop.train.TrainConfig`; writes ``checkpoint.pt``,
  ``metrics.jsonl`` and ``curves.png`` into ``--out``; ``--resume`` continues bitwise.
  Under ``torchrun --nproc_per_node N --no-python gradstats eqprop train ...`` (``WORLD_SIZE``
  > 1) it joins the process group from the environment (nccl on CUDA, gloo on CPU), trains
  data-parallel with ``--batch-size`` per process, and leaves the group at the end.
* ``probe RUN``: loads the run's checkpoint and its saved configuration (explicit overrides are
  echoed), compares every estimator with the exact implicit gradient per parameter group, sweeps
  T2, β/r and N, runs ``diagnose()`` and writes ``probe.json``, ``probe.csv`` and ``probe.png``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from gradstats.cli._config import add_config_arguments, config_from_args, option

__all__ = ["ProbeConfig", "register"]


@dataclass(frozen=True)
class ProbeConfig:
    path: Path = option(
        Path("."),
        "run folder (or its checkpoint.pt) of 'gradstats eqprop train'",
        positional=True,
        metavar="RUN",
    )
    methods: tuple[str, ...] = option(
        ("aep", "holomorphic", "ep_symmetric"),
        "estimators to compare with the implicit gradient (unsupported ones are skipped)",
        nargs="+",
    )
    batch_size: int = option(4, "validation windows in the probe batch")
    seed: int = option(0, "seed of the probe batch")
    t2_sweep: tuple[int, ...] = option(
        (10, 20, 40, 80), "T2 values (nudged/adjoint steps)", nargs="*"
    )
    beta_sweep: tuple[float, ...] = option(
        (), "aep/ep_symmetric beta values (default: x1/4, x1/2, x1, x2 of the run's)", nargs="*"
    )
    r_sweep: tuple[float, ...] = option(
        (), "holomorphic radius r values (default: x1/4, x1/2, x1, x2 of the run's)", nargs="*"
    )
    points_sweep: tuple[int, ...] = option((2, 4, 6, 8), "holomorphic N values", nargs="*")
    t1_sweep: tuple[int, ...] = option((), "T1 values (free-phase steps)", nargs="*")
    t1: int | None = option(None, "override: free-phase step cap")
    tol: float | None = option(None, "override: free-phase tolerance")
    t2: int | None = option(None, "override: nudged/adjoint step cap")
    tol_adjoint: float | None = option(None, "override: nudged/adjoint tolerance")
    beta: float | None = option(None, "override: beta (holomorphic: r)")
    points: int | None = option(None, "override: holomorphic N")
    float64: bool = option(True, "compute the reference on a float64 copy")
    out: Path | None = option(None, "output folder (default: the run folder)")


def _train(args: argparse.Namespace) -> int:
    from gradstats.cli import CLIError
    from gradstats.eqprop.train import TrainConfig, TrainingDiverged, train
    from gradstats.eqprop.train._distributed import process_group_from_env

    config = config_from_args(TrainConfig, args)
    with process_group_from_env(config.device) as group:
        try:
            result = train(config)
        except TrainingDiverged as error:
            raise CLIError(str(error)) from None
    if not group.main:
        return 0
    print(
        f"step {result.step}: val CE {result.val_ce:.4f}, {result.skipped_steps} skipped steps, "
        f"{100 * result.unconverged_fraction:.2f}% unconverged phases; run folder "
        f"{Path(config.out).resolve()}"
    )
    return 0


_OVERRIDES = {  # probe option -> (training option, estimator setting)
    "t1": ("t1", "max_steps"),
    "tol": ("tol", "tol"),
    "t2": ("t2", "max_steps_adjoint"),
    "tol_adjoint": ("tol_adjoint", "tol_adjoint"),
    "beta": ("beta", "beta"),
    "points": ("points", "points"),
}


def _probe(args: argparse.Namespace) -> int:
    import torch

    from gradstats.data import load_corpus
    from gradstats.eqprop import diagnose, probe
    from gradstats.eqprop.models import EquilibriumTransformer
    from gradstats.eqprop.train import TrainConfig, build_from_checkpoint, load_checkpoint

    config = config_from_args(ProbeConfig, args)
    state = load_checkpoint(config.path)
    run = TrainConfig.from_dict(state["config"])
    model = build_from_checkpoint(state)
    if not isinstance(model, EquilibriumTransformer):
        raise ValueError(
            f"{config.path} holds a {state['model_class']}: the probe needs an equilibrium model"
        )
    settings = {
        "step_size": run.step_size,
        "max_steps": run.t1,
        "tol": run.tol,
        "max_steps_adjoint": run.t2,
        "tol_adjoint": run.tol_adjoint,
        "beta": run.beta,
        "points": run.points,
        "anchor": run.anchor,
    }
    echoed = []
    for name, (train_name, key) in _OVERRIDES.items():
        value = getattr(config, name)
        if value is not None:
            echoed.append(f"{name}={value!r} (run: {getattr(run, train_name)!r})")
            settings[key] = value
    where = f"step {state['step']}, {model.describe()}, trained with {run.method}"
    print(f"probe of {config.path} ({where})")
    print("overrides: " + (", ".join(echoed) if echoed else "none (the run's settings)"))
    methods = [m for m in config.methods if m in model.supported_methods()]
    skipped = sorted(set(config.methods) - set(methods))
    if skipped:
        print(f"skipping {skipped}: not supported by {model.describe()}")
    corpus = load_corpus(run.data)
    if corpus.sha256 != state["corpus"]["sha256"]:
        raise ValueError("the corpus differs from the one the run was trained on")
    x, y = corpus.batch(
        "val",
        config.batch_size,
        run.block_size,
        generator=torch.Generator().manual_seed(config.seed),
    )
    common: dict[str, list] = {}
    if config.t2_sweep:
        common["T2"] = list(config.t2_sweep)
    if config.t1_sweep:
        common["T1"] = list(config.t1_sweep)
    defaults = model.solver_defaults["beta"]
    report = None
    for group in (
        [m for m in methods if m != "holomorphic"],
        [m for m in methods if m == "holomorphic"],
    ):
        if not group:
            continue
        holo = group == ["holomorphic"]
        base = settings["beta"] or defaults["holomorphic" if holo else "aep"]
        given = config.r_sweep if holo else config.beta_sweep
        sweeps = {**common, "beta": list(given) or [base * f for f in (0.25, 0.5, 1.0, 2.0)]}
        if holo and config.points_sweep:
            sweeps["points"] = list(config.points_sweep)
        part = probe(
            model,
            x,
            y,
            methods=group,
            sweeps=sweeps,
            float64=config.float64,
            **{k: v for k, v in settings.items() if v is not None},
        )
        if report is None:
            report = part
        else:
            report.rows += part.rows
            report.sweeps.update({f"holomorphic.{k}": v for k, v in part.sweeps.items()})
            report.warnings += part.warnings
    if report is None:
        raise ValueError(
            f"none of the methods {list(config.methods)} is supported by {model.describe()}"
        )
    findings = diagnose(report)
    out = config.out or (config.path if config.path.is_dir() else config.path.parent)
    paths = report.save(out)
    data = json.loads(paths["json"].read_text())
    data["checkpoint"] = {"path": str(config.path), "step": state["step"], "method": run.method}
    data["overrides"] = echoed
    data["diagnose"] = [
        {"name": f.name, "method": f.method, "evidence": f.evidence} for f in findings
    ]
    paths["json"].write_text(json.dumps(data, indent=1))
    print(report.table(group=None if config.batch_size <= 0 else "all"))
    worst = {}
    for row in report.rows:
        if row["sweep"] is None and row["group"] != "all":
            prev = worst.get(row["method"])
            if prev is None or row["cos"] < prev[0]:
                worst[row["method"]] = (row["cos"], row["group"])
    for method, (cos, group) in worst.items():
        print(f"{method}: min over parameter groups of cos = {cos:.6f} ({group})")
    print("diagnose:")
    for finding in findings:
        print(f"  {finding}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
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
