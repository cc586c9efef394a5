"""``gradstats eqprop train`` and ``gradstats eqprop probe``: the equilibrium transformer LM.

* ``train``: options from :class:`gradstats.eqprop.train.TrainConfig`; writes ``checkpoint.pt``,
  ``metrics.jsonl`` and ``curves.png`` into ``--out``; ``--resume`` continues bitwise.
  Under ``torchrun --nproc_per_node N --no-python gradstats eqprop train ...`` (``WORLD_SIZE``
  > 1) it joins the process group from the environment (nccl on CUDA, gloo on CPU), trains
  data-parallel with ``--batch-size`` per process, and leaves the group at the end.
* ``probe RUN``: loads the run's checkpoint and its saved configuration (explicit overrides are
  echoed), compares every estimator with the exact implicit gradient per parameter group, sweeps
  T2, β/r and N, runs ``diagnose()`` and writes ``probe.json``, ``probe.csv`` and ``probe.png``.
  The run's ``beta`` is a real nudge β for an aep/ep_symmetric run and the radius r for a
  holomorphic run: it is used only for the probed methods of that kind (the others use the
  model's per-method default); ``--beta`` overrides the real nudges, ``--r`` the radius. The β/r
  each method used is printed and stored in ``probe.json`` (``beta_used``).
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
        (), "real-nudge beta values (default: x1/4, x1/2, x1, x2 of the beta used)", nargs="*"
    )
    r_sweep: tuple[float, ...] = option(
        (), "holomorphic radius r values (default: x1/4, x1/2, x1, x2 of the r used)", nargs="*"
    )
    points_sweep: tuple[int, ...] = option((2, 4, 6, 8), "holomorphic N values", nargs="*")
    t1_sweep: tuple[int, ...] = option((), "T1 values (free-phase steps)", nargs="*")
    t1: int | None = option(None, "override: free-phase step cap")
    tol: float | None = option(None, "override: free-phase tolerance")
    t2: int | None = option(None, "override: nudged/adjoint step cap")
    tol_adjoint: float | None = option(None, "override: nudged/adjoint tolerance")
    beta: float | None = option(None, "override: the real nudge beta (ep, ep_symmetric, aep)")
    r: float | None = option(None, "override: the holomorphic radius r")
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
    val = "n/a" if result.val_ce is None else f"{result.val_ce:.4f}"
    print(
        f"step {result.step}: val CE {val}, {result.skipped_steps} skipped steps, "
        f"{100 * result.unconverged_fraction:.2f}% unconverged phases; run folder "
        f"{Path(config.out).resolve()}"
    )
    return 0


_OVERRIDES = {  # probe option -> (training option, estimator setting)
    "t1": ("t1", "max_steps"),
    "tol": ("tol", "tol"),
    "t2": ("t2", "max_steps_adjoint"),
    "tol_adjoint": ("tol_adjoint", "tol_adjoint"),
    "points": ("points", "points"),
}
_RUN_BETA = {  # the run's --beta is a real nudge for these methods, the radius r for holomorphic
    "aep": ("aep", "ep_symmetric"),
    "ep_symmetric": ("aep", "ep_symmetric"),
    "holomorphic": ("holomorphic",),
}


def _betas(run, config: ProbeConfig, model, methods: list[str]) -> dict[str, tuple[float, str]]:
    """Per probed method, the beta (holomorphic: r) the probe uses and where it comes from.

    An override (``--beta`` for the real nudges, ``--r`` for holomorphic) first; else the run's
    ``beta`` for the methods of the run's kind (an aep/ep_symmetric run's beta for aep and
    ep_symmetric, a holomorphic run's r for holomorphic); else the model's per-method default.
    """
    out = {}
    for method in (m for m in methods if m in model.solver_defaults["beta"]):
        override = config.r if method == "holomorphic" else config.beta
        if override is not None:
            out[method] = (float(override), "override")
        elif run.beta is not None and method in _RUN_BETA.get(run.method, ()):
            out[method] = (float(run.beta), f"the {run.method} run's")
        else:
            out[method] = (float(model.solver_defaults["beta"][method]), "model default")
    return out


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
        "points": run.points,
        "anchor": run.anchor,
    }
    settings = {k: v for k, v in settings.items() if v is not None}
    echoed = []
    for name, (train_name, key) in _OVERRIDES.items():
        value = getattr(config, name)
        if value is not None:
            echoed.append(f"{name}={value!r} (run: {getattr(run, train_name)!r})")
            settings[key] = value
    for name, kind in (("beta", "real nudge beta"), ("r", "holomorphic r")):
        value = getattr(config, name)
        if value is not None:
            echoed.append(f"{name}={value!r} ({kind}; run: {run.method} beta={run.beta!r})")
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
    betas = _betas(run, config, model, methods)
    used = [f"{m} {'r' if m == 'holomorphic' else 'beta'}={v:g} ({src})" for m, (v, src) in
            betas.items()]  # fmt: skip
    print("beta/r: " + (", ".join(used) or "none"))
    # one probe() per (kind, beta): real nudges first, then holomorphic; methods without a
    # beta (implicit, bptt) join the first group
    groups: dict[tuple[bool, float | None], list[str]] = {}
    for method in sorted(methods, key=lambda m: (m not in betas, m == "holomorphic")):
        key = (
            (method == "holomorphic", betas[method][0])
            if method in betas
            else next(iter(groups), (False, None))
        )
        groups.setdefault(key, []).append(method)
    report = None
    for (holo, base), group in groups.items():
        sweeps = dict(common)
        if base is not None:
            given = config.r_sweep if holo else config.beta_sweep
            sweeps["beta"] = list(given) or [base * f for f in (0.25, 0.5, 1.0, 2.0)]
        if holo and config.points_sweep:
            sweeps["points"] = list(config.points_sweep)
        part = probe(
            model,
            x,
            y,
            methods=group,
            sweeps=sweeps,
            float64=config.float64,
            generator=torch.Generator().manual_seed(config.seed + 1),  # one noise draw for all
            **settings,
            **({} if base is None else {"beta": base}),
        )
        if report is None:
            report = part
        else:
            report.rows += part.rows
            report.sweeps.update({f"{'+'.join(group)}.{k}": v for k, v in part.sweeps.items()})
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
    data["beta_used"] = {m: {"value": v, "source": src} for m, (v, src) in betas.items()}
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
