"""``gradstats eqprop probe RUN``: every estimator against the exact gradient on a trained run.

Loads the run's checkpoint and its saved configuration (explicit overrides are echoed), compares
every estimator with the exact implicit gradient per parameter group, sweeps T2, β/r and N, runs
``diagnose()`` and writes ``probe.json``, ``probe.csv`` and ``probe.png``. The output folder is
checked (and the checkpoint read) before any compute.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradstats._files import write_text_atomic
from gradstats.cli._checks import check_out_dir
from gradstats.cli._config import option
from gradstats.errors import ConfigurationError, StateError

__all__ = ["ProbeConfig", "run_probe"]


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
    threads: int | None = option(
        None,
        "torch CPU threads (default: 1 per 2^19 state elements batch*block*d_model of the probe "
        "batch, at most torch's default: 1 for the small models, which torch's one-per-core "
        "default slows down by 10-50x on a busy machine)",
    )


#: Probe options that override one of the run's settings (the same names as the trainer's).
_OVERRIDES = ("t1", "tol", "t2", "tol_adjoint", "points")


def _betas(run, config: ProbeConfig, model, methods: list[str]) -> dict[str, tuple[float, str]]:
    """Per probed nudged method, the beta (holomorphic: r) the probe uses and where it comes from.

    An override (``--beta`` for the real nudges, ``--r`` for holomorphic) first; else the run's
    ``beta`` for the methods that share the run's nudge (:meth:`Estimator.shares_nudge`: an
    aep/ep_symmetric run's beta for aep and ep_symmetric, a holomorphic run's r for
    holomorphic); else the model's default for the method.
    """
    from gradstats.eqprop import get_estimator
    from gradstats.eqprop._settings import resolve_settings

    out = {}
    trained = get_estimator(run.method) if run.method != "backprop" else None
    for estimator in (get_estimator(m) for m in methods):
        if not estimator.nudged:
            continue
        override = config.r if "real" not in estimator.model_kinds else config.beta
        if override is not None:
            out[estimator.name] = (float(override), "override")
        elif run.beta is not None and trained is not None and estimator.shares_nudge(trained):
            out[estimator.name] = (float(run.beta), f"the {run.method} run's")
        else:
            dtype = next(model.parameters()).dtype
            resolved = resolve_settings(estimator.name, model.solver_defaults, dtype)
            beta = resolved.as_dict()["beta"]
            assert isinstance(beta, float)  # every nudged estimator resolves a beta
            out[estimator.name] = (beta, "model default")
    return out


def _load(config: ProbeConfig) -> tuple[dict[str, Any], Any, Any]:
    """(checkpoint, the run's TrainConfig, the model) of ``config.path``; nothing computed."""
    from gradstats.eqprop.models import EquilibriumTransformer
    from gradstats.eqprop.train import TrainConfig, build_from_checkpoint, load_checkpoint

    state = load_checkpoint(config.path, require=("corpus.sha256",))
    try:
        run = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as error:
        raise StateError(
            f"{config.path}: the saved run configuration is invalid: {error}"
        ) from None
    model = build_from_checkpoint(state)
    if not isinstance(model, EquilibriumTransformer):
        raise ConfigurationError(
            f"{config.path} holds a {state['model_class']}: the probe needs an equilibrium model"
        )
    return state, run, model


def _groups(methods: list[str], betas: dict[str, tuple[float, str]]):
    """One probe() per (kind, beta): real nudges first, then holomorphic; methods without a
    beta (implicit, bptt) join the first group."""
    groups: dict[tuple[bool, float | None], list[str]] = {}
    for method in sorted(methods, key=lambda m: (m not in betas, m == "holomorphic")):
        group_key: tuple[bool, float | None] = (
            (method == "holomorphic", betas[method][0])
            if method in betas
            else next(iter(groups), (False, None))
        )
        groups.setdefault(group_key, []).append(method)
    return groups


def _worst(rows: Sequence[Mapping[str, object]]) -> dict[str, tuple[float, str]]:
    """Per method, the lowest cosine over parameter groups and the group attaining it."""
    worst: dict[str, tuple[float, str]] = {}
    for row in rows:
        cos, group, method = row["cos"], str(row["group"]), str(row["method"])
        if row["sweep"] is None and group != "all" and isinstance(cos, (int, float)):
            prev = worst.get(method)
            if prev is None or cos < prev[0]:
                worst[method] = (float(cos), group)
    return worst


def _check_values(config: ProbeConfig) -> None:
    """Every override and sweep value, checked before anything is loaded or computed (the probe
    runs one group of methods after another: a bad ``--r`` would fail only after the real
    nudges' group had been computed)."""
    import math

    def bad_int(value: object) -> bool:
        return isinstance(value, bool) or not isinstance(value, int) or value < 1

    for name in ("t1", "t2", "points"):
        value = getattr(config, name)
        if value is not None and bad_int(value):
            raise ConfigurationError(f"--{name.replace('_', '-')} must be >= 1; got {value!r}")
    for name in ("t2_sweep", "t1_sweep", "points_sweep"):
        for value in getattr(config, name):
            if bad_int(value):
                flag = "--" + name.replace("_", "-")
                raise ConfigurationError(f"{flag} values must be >= 1; got {value!r}")
    for name in ("beta", "r"):
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigurationError(f"--{name} must be a finite number > 0; got {value!r}")
    for name in ("beta_sweep", "r_sweep"):
        for value in getattr(config, name):
            if not (math.isfinite(value) and value > 0):
                flag = "--" + name.replace("_", "-")
                raise ConfigurationError(f"{flag} values must be finite and > 0; got {value!r}")
    for name in ("tol", "tol_adjoint"):
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            flag = "--" + name.replace("_", "-")
            raise ConfigurationError(f"{flag} must be a finite number >= 0; got {value!r}")


def run_probe(config: ProbeConfig) -> dict[str, Path]:
    """Probe the run ``config.path``, print the findings, write the files; return their paths.

    Runs with ``config.threads`` CPU threads (default: :func:`auto_threads` of the probe batch)
    and flushed denormals; both settings are restored afterwards.
    """
    from gradstats.eqprop._iterate import flush_denormal
    from gradstats.eqprop.train._runtime import auto_threads, threads

    if config.threads is not None and (
        isinstance(config.threads, bool)
        or not isinstance(config.threads, int)
        or config.threads < 1
    ):
        raise ConfigurationError(f"threads must be an int >= 1; got {config.threads!r}")
    _check_values(config)
    out = config.out or (config.path if config.path.is_dir() else config.path.parent)
    check_out_dir(out, "--out" if config.out else "the run folder (the default --out)")
    state, run, model = _load(config)
    features = getattr(model, "state_features", run.d_model)  # 2C for a layered block
    count = config.threads or auto_threads(config.batch_size * run.block_size * features)
    with threads(count), flush_denormal():
        return _run_probe(config, out, state, run, model)


@dataclass(frozen=True)
class _Plan:
    """What one probe of a run does: the run's settings with the overrides, the methods, the
    β/r of each nudged one, and the echo of the overrides."""

    settings: dict[str, Any]
    echoed: list[str]
    methods: list[str]
    betas: dict[str, tuple[float, str]]


def _plan(config: ProbeConfig, run, model) -> _Plan:
    """The run's settings (T1/T2 as the registry maps them), overridden by the probe's options."""
    from gradstats.eqprop._registry import T1_KEY, T2_KEY

    keys = {"t1": T1_KEY, "tol": "tol", "t2": T2_KEY, "tol_adjoint": "tol_adjoint"}
    names = {"step_size": "step_size", **keys, "points": "points", "anchor": "anchor"}
    settings = {key: getattr(run, name) for name, key in names.items()}
    settings = {k: v for k, v in settings.items() if v is not None}
    echoed = []
    for name in _OVERRIDES:
        value = getattr(config, name)
        if value is not None:
            echoed.append(f"{name}={value!r} (run: {getattr(run, name)!r})")
            settings[keys.get(name, name)] = value
    for name, kind in (("beta", "real nudge beta"), ("r", "holomorphic r")):
        value = getattr(config, name)
        if value is not None:
            echoed.append(f"{name}={value!r} ({kind}; run: {run.method} beta={run.beta!r})")
    methods = [m for m in config.methods if m in model.supported_methods()]
    return _Plan(settings, echoed, methods, _betas(run, config, model, methods))


def _probe_all(config: ProbeConfig, plan: _Plan, model, x, y):
    """One ``probe()`` per (nudge kind, β) group of methods, merged into one report."""
    import torch

    from gradstats.eqprop import probe

    common: dict[str, list[float]] = {}
    if config.t2_sweep:
        common["T2"] = list(config.t2_sweep)
    if config.t1_sweep:
        common["T1"] = list(config.t1_sweep)
    report = None
    for (holo, base), group in _groups(plan.methods, plan.betas).items():
        sweeps = dict(common)
        if base is not None:
            given = config.r_sweep if holo else config.beta_sweep
            sweeps["beta"] = list(given) or [base * f for f in (0.25, 0.5, 1.0, 2.0)]
        if holo and config.points_sweep:
            sweeps["points"] = list(config.points_sweep)
        extra: dict[str, Any] = {} if base is None else {"beta": base}
        part = probe(
            model,
            x,
            y,
            methods=group,
            sweeps=sweeps,
            float64=config.float64,
            generator=torch.Generator().manual_seed(config.seed + 1),  # one noise draw for all
            **plan.settings,
            **extra,
        )
        if report is None:
            report = part
        else:
            report.rows += part.rows
            report.sweeps.update({f"{'+'.join(group)}.{k}": v for k, v in part.sweeps.items()})
            report.warnings += part.warnings
    assert report is not None  # methods is not empty: at least one group ran
    return report


def _run_probe(config: ProbeConfig, out: Path, state, run, model) -> dict[str, Path]:
    import torch

    from gradstats.data import load_corpus
    from gradstats.eqprop import diagnose

    plan = _plan(config, run, model)
    where = f"step {state['step']}, {model.describe()}, trained with {run.method}"
    print(f"probe of {config.path} ({where})")
    print("overrides: " + (", ".join(plan.echoed) if plan.echoed else "none (the run's settings)"))
    skipped = sorted(set(config.methods) - set(plan.methods))
    if skipped:
        print(f"skipping {skipped}: not supported by {model.describe()}")
    if not plan.methods:
        raise ConfigurationError(
            f"none of the methods {list(config.methods)} is supported by {model.describe()}"
        )
    corpus = load_corpus(run.data)
    if corpus.sha256 != state["corpus"]["sha256"]:
        raise StateError("the corpus differs from the one the run was trained on")
    generator = torch.Generator().manual_seed(config.seed)
    x, y = corpus.batch("val", config.batch_size, run.block_size, generator=generator)
    used = [f"{m} {'r' if m == 'holomorphic' else 'beta'}={v:g} ({src})" for m, (v, src) in
            plan.betas.items()]  # fmt: skip
    print("beta/r: " + (", ".join(used) or "none"))
    report = _probe_all(config, plan, model, x, y)
    findings = diagnose(report)
    paths = report.save(out)
    data = json.loads(paths["json"].read_text())
    data["checkpoint"] = {"path": str(config.path), "step": state["step"], "method": run.method}
    data["overrides"] = plan.echoed
    data["beta_used"] = {m: {"value": v, "source": src} for m, (v, src) in plan.betas.items()}
    data["diagnose"] = [
        {"name": f.name, "method": f.method, "evidence": f.evidence} for f in findings
    ]
    write_text_atomic(paths["json"], json.dumps(data, indent=1))
    print(report.table(group=None if config.batch_size <= 0 else "all"))
    for method, (cos, group_name) in _worst(report.rows).items():
        print(f"{method}: min over parameter groups of cos = {cos:.6f} ({group_name})")
    print("diagnose:")
    for finding in findings:
        print(f"  {finding}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return paths
