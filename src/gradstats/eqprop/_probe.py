"""The probe: every estimator against the exact implicit gradient, per parameter group.

:func:`probe` takes the model object itself (never a re-built one), computes the reference
g_implicit (tight tolerances, GMRES, optionally on a float64 copy), g_bptt(T1) and each
estimator's gradient — all with one noise realisation — and reports per parameter group:
cos(g_est, g_implicit), the relative error ‖g_est − g_implicit‖/‖g_implicit‖,
cos(g_bptt(T1), g_implicit), the free residual of the state the estimator used (``res_free_T1``),
the free residual of the reference fixed point (``res_free_final``), the estimator's own
adjoint/contrast residual (``res_adjoint``) and the steps of each phase. Sweeps vary one setting:

* ``T2``: the nudged/adjoint step count (run exactly: ``tol_adjoint=0``);
* ``beta``: β, or the radius r for ``holomorphic``;
* ``points``: N (``holomorphic``);
* ``T1``: the free-phase step count (run exactly: ``tol=0``; BPTT uses the same T1).

Which sweeps apply to a method, and which settings a sweep value sets for it, is declared by the
method's :class:`~gradstats.eqprop.Estimator` (``sweeps``, ``sweep_settings``).

:func:`~gradstats.eqprop.diagnose` reads a report and names what limits each estimator.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradstats._validation import check_choice
from gradstats.eqprop._autodiff import Linearization, per_sample_norm
from gradstats.eqprop._estimators import (
    ESTIMATORS,
    check_method_supported,
    estimate_gradient,
    get_estimator,
)
from gradstats.eqprop._module import EquilibriumModule, NoiseRealization, model_fingerprint
from gradstats.eqprop._probe_report import FORMAT, VERSION, ProbeReport, ProbeRow
from gradstats.eqprop._problem import prepare
from gradstats.eqprop._registry import SWEEP_AXES, Estimator
from gradstats.eqprop._settings import SOLVER_KEYS, check_float, resolve_settings, setting_keys
from gradstats.eqprop._stats import GradientEstimate
from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = ["FORMAT", "SWEEPS", "VERSION", "ProbeReport", "ProbeRow", "probe"]


def _axis(name: str) -> Callable[[float], dict[str, Any]]:
    return lambda value: get_estimator("holomorphic").sweep_settings(name, value)


#: Sweep name -> the settings each value sets (an estimator with every axis; per estimator:
#: ``get_estimator(method).sweep_settings(name, value)``).
SWEEPS: dict[str, Callable[[float], dict[str, Any]]] = {name: _axis(name) for name in SWEEP_AXES}
_REFERENCE: dict[str, Any] = {
    "tol": 1e-12,
    "tol_adjoint": 1e-11,
    "max_steps": 100_000,
    "adjoint_solver": "gmres",
    "gmres_restart": 30,
}


@dataclass(frozen=True)
class _Run:
    """One estimate the probe makes: an estimator at one sweep value (``None``: the base run)."""

    estimator: Estimator
    sweep: str | None
    value: float | None
    settings: dict[str, Any]


@dataclass(frozen=True)
class _Request:
    """A checked probe request: every run's settings are valid before anything is computed."""

    runs: tuple[_Run, ...]
    settings: dict[str, Any]
    reference: dict[str, Any]
    sweeps: dict[str, list[float]]
    float64: bool
    bptt: bool


@dataclass(frozen=True)
class _Reference:
    """The exact gradient (and what the rows compare with), computed once per probe."""

    estimate: GradientEstimate
    adjoint: torch.Tensor
    asymmetry: float
    groups: dict[str, list[str]]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else math.nan


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    nb = float(b.norm())
    return float((a - b).norm()) / nb if nb > 0 else math.nan


def _flat(grads: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([grads[n].detach().double().cpu().reshape(-1) for n in names])


def _groups(model: EquilibriumModule) -> dict[str, list[str]]:
    groups = dict(model.parameter_groups())
    groups["all"] = [n for n, p in model.named_parameters() if p.requires_grad]
    return groups


def _worst(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.detach().double().max())


def _reference_model(
    model: EquilibriumModule,
    x: torch.Tensor,
    y: torch.Tensor,
    noise: NoiseRealization | None,
    float64: bool,
) -> tuple[EquilibriumModule, torch.Tensor, torch.Tensor, NoiseRealization | None]:
    if not float64:
        return model, x, y, noise
    ref = copy.deepcopy(model).to(torch.float64)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return ref, cast(x), cast(y), None if noise is None else noise.to(torch.float64)


def _check_sweeps(sweeps: Mapping[str, Sequence[float]] | None) -> dict[str, list[float]]:
    if sweeps is not None and not isinstance(sweeps, Mapping):
        raise ConfigurationTypeError(
            f"sweeps must be a mapping {{sweep: [values]}}; got {type(sweeps).__name__}"
        )
    out: dict[str, list[float]] = {}
    for name, values in (sweeps or {}).items():
        check_choice("sweeps", name, tuple(SWEEP_AXES))
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ConfigurationTypeError(
                f"sweeps[{name!r}] must be a list of numbers; got {type(values).__name__}"
            )
        if not values:
            raise ConfigurationError(f"sweeps[{name!r}] is empty")
        numbers = [check_float(f"sweeps[{name!r}] value", v) for v in values]
        if name in ("T2", "points", "T1") and any(v != int(v) for v in numbers):
            raise ConfigurationError(
                f"sweeps[{name!r}] values must be whole numbers; got {list(values)}"
            )
        out[name] = list(values)
    return out


def _check_settings(name: str, values: Mapping[str, Any] | None) -> dict[str, Any]:
    if values is not None and not isinstance(values, Mapping):
        raise ConfigurationTypeError(
            f"{name} must be a mapping of settings; got {type(values).__name__}"
        )
    keys = setting_keys()
    unknown = sorted(set(values or {}) - set(keys))
    if unknown:
        where = "" if name == "settings" else f"{name} has "
        raise ConfigurationError(f"{where}unknown setting(s) {unknown}; valid: {', '.join(keys)}")
    return dict(values or {})


def _runs(
    estimator: Estimator, settings: Mapping[str, Any], sweeps: Mapping[str, list[float]]
) -> list[_Run]:
    """The base run and one run per value of each sweep that applies to ``estimator``."""
    base = estimator.select(settings, SOLVER_KEYS)
    runs = [_Run(estimator, None, None, base)]
    for name, values in sweeps.items():
        if name in estimator.sweeps:
            for value in values:
                override = estimator.select(estimator.sweep_settings(name, value), SOLVER_KEYS)
                runs.append(_Run(estimator, name, value, {**base, **override}))
    return runs


def _request(
    model: EquilibriumModule,
    methods: Sequence[str],
    sweeps: Mapping[str, Sequence[float]] | None,
    reference: Mapping[str, Any] | None,
    flags: Mapping[str, object],
    settings: Mapping[str, Any],
) -> _Request:
    """Check everything (types, names, every run's settings) before any compute."""
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise ConfigurationTypeError(
            f"methods must be a non-empty list of method names; got {methods!r}"
        )
    if not isinstance(model, EquilibriumModule):
        raise ConfigurationTypeError(
            f"model must be an EquilibriumModule; got {type(model).__name__}"
        )
    estimators = []
    for method in methods:
        check_choice("methods", method, tuple(ESTIMATORS))
        estimators.append(check_method_supported(model, method))
    given = _check_settings("settings", settings)
    ref = {**_REFERENCE, **_check_settings("reference", reference)}
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigurationTypeError(f"{flag} must be a bool; got {type(value).__name__}")
    checked = _check_sweeps(sweeps)
    runs = [run for e in estimators for run in _runs(e, given, checked)]
    dtype = next(model.parameters()).dtype
    for run in runs:
        resolve_settings(run.estimator.name, model.solver_defaults, dtype, **run.settings)
    return _Request(tuple(runs), given, ref, checked, bool(flags["float64"]), bool(flags["bptt"]))


def _reference(
    model: EquilibriumModule,
    x: torch.Tensor,
    y: torch.Tensor,
    noise: NoiseRealization | None,
    request: _Request,
) -> _Reference:
    """g_implicit at tight tolerances (a float64 copy with ``float64``), λ and ‖Jv − Jᵀv‖/‖Jv‖."""
    ref_model, rx, ry, rnoise = _reference_model(model, x, y, noise, request.float64)
    ref = estimate_gradient(ref_model, rx, ry, "implicit", noise=rnoise, **request.reference)
    if ref.state is None or ref.adjoint is None:
        raise ConfigurationError("the reference estimate returned no state")
    state = ref.state
    problem = prepare(ref_model, rx, ry, noise=rnoise)
    lin = Linearization(problem.force, state, ref_model.jvp_mode)
    gen = torch.Generator(device=state.device).manual_seed(0)
    v = torch.randn(state.shape, generator=gen, dtype=state.dtype, device=state.device)
    jv = lin.jvp(v)
    asymmetry = float(per_sample_norm(jv - lin.vjp(v)).norm() / per_sample_norm(jv).norm())
    return _Reference(ref, ref.adjoint, asymmetry, _groups(model))


def _row(run: _Run, group: str, est: GradientEstimate, ref: _Reference, **extra: Any) -> ProbeRow:
    names = ref.groups[group]
    g_ref = _flat(ref.estimate.grads, names)
    free = est.stats.get("free", est.stats.get("bptt"))
    adj = est.stats.get("nudged", est.stats.get("adjoint"))
    cos = rel_err = math.nan
    if not est.skipped:
        g = _flat(est.grads, names)
        cos, rel_err = _cos(g, g_ref), _rel(g, g_ref)
    anchor = est.settings["anchor"]
    g_bptt = extra.pop("g_bptt")
    return ProbeRow(
        method=run.estimator.name,
        sweep=run.sweep,
        value=run.value,
        group=group,
        cos=cos,
        rel_err=rel_err,
        cos_bptt=None if g_bptt is None else _cos(_flat(g_bptt, names), g_ref),
        res_free_T1=None if free is None else _worst(free.final_residual),
        res_free_final=_worst(ref.estimate.stats["free"].final_residual),
        res_adjoint=None if adj is None else _worst(adj.final_residual),
        steps_free=None if free is None else int(free.steps.max()),
        steps_adjoint=None if adj is None else int(adj.steps.max()),
        converged_adjoint=None if adj is None else adj.all_converged(),
        skipped=est.skipped,
        anchor=anchor if isinstance(anchor, str) else None,
        **extra,
    )


class _BPTT:
    """g_bptt(T1) for each T1 the runs use, each computed once."""

    def __init__(self, model, x, y, noise, settings: Mapping[str, Any]) -> None:
        self.args = (model, x, y)
        self.noise = noise
        self.settings = {k: v for k, v in settings.items() if k in ("step_size", "check_every")}
        self.cache: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, t1: int) -> dict[str, torch.Tensor]:
        if t1 not in self.cache:
            est = estimate_gradient(*self.args, "bptt", noise=self.noise, steps=t1, **self.settings)
            self.cache[t1] = est.grads
        return self.cache[t1]


def _measure(
    model: EquilibriumModule,
    x: torch.Tensor,
    y: torch.Tensor,
    noise: NoiseRealization | None,
    run: _Run,
    ref: _Reference,
    bptt: _BPTT | None,
) -> list[ProbeRow]:
    """The rows of one run: its estimate against the reference, per parameter group."""
    est = estimate_gradient(
        model, x, y, run.estimator.name, noise=noise, nonfinite="skip", **run.settings
    )
    steps, max_steps = est.settings["steps"], est.settings["max_steps"]
    t1 = steps if isinstance(steps, int) else max_steps
    if not isinstance(t1, int):
        raise ConfigurationError(f"max_steps must be an int; got {t1!r}")
    adj_err = None
    if est.adjoint is not None:
        lam = ref.adjoint.double().cpu().reshape(-1)
        adj_err = _rel(est.adjoint.double().cpu().reshape(-1), lam)
    g_bptt = None if bptt is None else bptt(t1)
    return [
        _row(run, group, est, ref, adj_err=adj_err, g_bptt=g_bptt, T1=t1) for group in ref.groups
    ]


def probe(
    model: EquilibriumModule,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    methods: Sequence[str] = ("aep",),
    sweeps: Mapping[str, Sequence[float]] | None = None,
    reference: Mapping[str, Any] | None = None,
    float64: bool = True,
    bptt: bool = True,
    noise: NoiseRealization | None = None,
    generator: torch.Generator | None = None,
    **settings: Any,
) -> ProbeReport:
    """Compare estimators with the exact implicit gradient on ``model`` (see module docstring).

    Args:
        model: the model to analyse — the object itself, so its exact dynamics are probed.
        x, y: one batch.
        methods: estimators to compare (any of ``METHODS``).
        sweeps: ``{"T2"|"beta"|"points"|"T1": [values]}``; each applies to the methods whose
            :attr:`Estimator.sweeps <gradstats.eqprop.Estimator.sweeps>` name it.
        reference: overrides of the reference settings (default: tol 1e-12, tol_adjoint 1e-11,
            GMRES, up to 100 000 steps).
        float64: compute the reference on a float64 copy of the model.
        bptt: also report cos(g_bptt(T1), g_implicit).
        noise, generator: one noise realisation for every estimate (drawn from ``generator``
            if not given).
        **settings: estimator settings applied to every method where they apply (echoed in the
            report as ``settings``).

    Returns:
        A :class:`ProbeReport` whose ``rows`` are :class:`ProbeRow` records. An estimate that
        diverges is skipped (``nonfinite="skip"``: its row has ``skipped=True`` and NaN
        ``cos``/``rel_err``); the reference must not diverge.

    Raises:
        ConfigurationError: an unknown or unsupported method, setting or sweep (checked before
            any compute); ``ConfigurationTypeError`` for a wrong type.
        DivergenceError: the reference (implicit) gradient diverged.
    """
    flags = {"float64": float64, "bptt": bptt}
    request = _request(model, methods, sweeps, reference, flags, settings)
    if noise is None:
        with torch.no_grad():
            noise = model.sample_noise(model.inject(x), generator)
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        ref = _reference(model, x, y, noise, request)
        g_bptt = _BPTT(model, x, y, noise, request.settings) if request.bptt else None
        rows = [
            row for run in request.runs for row in _measure(model, x, y, noise, run, ref, g_bptt)
        ]
        caught = [f"{w.category.__name__}: {w.message}" for w in log]
    est = ref.estimate
    described = {"class": type(model).__name__, "describe": model.describe()}
    return ProbeReport(
        rows=rows,
        model={**described, "config": model.config(), "fingerprint": model_fingerprint(model),
               "dtype": str(next(model.parameters()).dtype)},
        settings=dict(request.settings),
        reference={**request.reference, "float64": request.float64, "converged": est.converged(),
                   "res_free": _worst(est.stats["free"].final_residual),
                   "res_adjoint": _worst(est.stats["adjoint"].final_residual)},
        asymmetry=ref.asymmetry,
        sweeps=request.sweeps,
        warnings=caught,
    )  # fmt: skip
