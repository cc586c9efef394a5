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

:func:`~gradstats.eqprop.diagnose` reads a report and names what limits each estimator.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from gradstats._validation import check_choice
from gradstats.eqprop._autodiff import Linearization, per_sample_norm
from gradstats.eqprop._estimators import check_method_supported, estimate_gradient
from gradstats.eqprop._module import (
    METHODS,
    EquilibriumModule,
    NoiseRealization,
    model_fingerprint,
)
from gradstats.eqprop._probe_report import FORMAT, VERSION, ProbeReport, ProbeRow
from gradstats.eqprop._problem import prepare
from gradstats.eqprop._settings import (
    _APPLIES_TO,
    SETTING_KEYS,
    check_float,
    resolve_settings,
)
from gradstats.eqprop._stats import GradientEstimate
from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = ["FORMAT", "SWEEPS", "VERSION", "ProbeReport", "ProbeRow", "probe"]

#: Sweep name -> the settings each value sets.
SWEEPS: dict[str, Callable[[float], dict[str, Any]]] = {
    "T2": lambda v: {"max_steps_adjoint": int(v), "tol_adjoint": 0.0},
    "beta": lambda v: {"beta": float(v)},
    "points": lambda v: {"points": int(v)},
    "T1": lambda v: {"max_steps": int(v), "tol": 0.0},
}
_SWEEP_METHODS = {
    "T2": ("implicit", "ep", "ep_symmetric", "aep", "holomorphic"),
    "beta": ("ep", "ep_symmetric", "aep", "holomorphic"),
    "points": ("holomorphic",),
    "T1": METHODS,
}
_REFERENCE: dict[str, Any] = {
    "tol": 1e-12,
    "tol_adjoint": 1e-11,
    "max_steps": 100_000,
    "adjoint_solver": "gmres",
    "gmres_restart": 30,
}


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


def _for_method(method: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in settings.items() if k not in _APPLIES_TO or method in _APPLIES_TO[k]}
    if method == "holomorphic" and out.get("correction") is False:
        out.pop("anchor", None)  # the anchor only exists with the AEP correction
    return out


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
        check_choice("sweeps", name, tuple(SWEEPS))
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


def _run_settings(
    method: str, settings: Mapping[str, Any], override: Mapping[str, Any]
) -> dict[str, Any]:
    kw = {**_for_method(method, settings), **_for_method(method, override)}
    if method == "bptt" and "max_steps" in override:
        kw["steps"] = override["max_steps"]
    return kw


def _row(
    method: str,
    sweep: str | None,
    value: float | None,
    group: str,
    est: GradientEstimate,
    g_ref: torch.Tensor,
    names: list[str],
    *,
    ref: GradientEstimate,
    adj_err: float | None,
    g_bptt: dict[str, torch.Tensor] | None,
    t1: int,
) -> ProbeRow:
    free = est.stats.get("free", est.stats.get("bptt"))
    adj = est.stats.get("nudged", est.stats.get("adjoint"))
    cos = rel_err = math.nan
    if not est.skipped:
        g = _flat(est.grads, names)
        cos, rel_err = _cos(g, g_ref), _rel(g, g_ref)
    anchor = est.settings["anchor"]
    return ProbeRow(
        method=method,
        sweep=sweep,
        value=value,
        group=group,
        cos=cos,
        rel_err=rel_err,
        adj_err=adj_err,
        cos_bptt=None if g_bptt is None else _cos(_flat(g_bptt, names), g_ref),
        res_free_T1=None if free is None else _worst(free.final_residual),
        res_free_final=_worst(ref.stats["free"].final_residual),
        res_adjoint=None if adj is None else _worst(adj.final_residual),
        steps_free=None if free is None else int(free.steps.max()),
        steps_adjoint=None if adj is None else int(adj.steps.max()),
        converged_adjoint=None if adj is None else adj.all_converged(),
        skipped=est.skipped,
        T1=t1,
        anchor=anchor if isinstance(anchor, str) else None,
    )


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
        sweeps: ``{"T2"|"beta"|"points"|"T1": [values]}``.
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
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise ConfigurationTypeError(
            f"methods must be a non-empty list of method names; got {methods!r}"
        )
    if not isinstance(model, EquilibriumModule):
        raise ConfigurationTypeError(
            f"model must be an EquilibriumModule; got {type(model).__name__}"
        )
    for method in methods:
        check_choice("methods", method, METHODS)
        check_method_supported(model, method)
    unknown = sorted(set(settings) - set(SETTING_KEYS))
    if unknown:
        raise ConfigurationError(f"unknown setting(s) {unknown}; valid: {', '.join(SETTING_KEYS)}")
    if reference is not None and not isinstance(reference, Mapping):
        raise ConfigurationTypeError(
            f"reference must be a mapping of settings; got {type(reference).__name__}"
        )
    unknown = sorted(set(reference or {}) - set(SETTING_KEYS))
    if unknown:
        raise ConfigurationError(
            f"reference has unknown setting(s) {unknown}; valid: {', '.join(SETTING_KEYS)}"
        )
    for flag, given in (("float64", float64), ("bptt", bptt)):
        if not isinstance(given, bool):
            raise ConfigurationTypeError(f"{flag} must be a bool; got {type(given).__name__}")
    checked = _check_sweeps(sweeps)
    dtype = next(model.parameters()).dtype
    for method in methods:  # every run's settings are valid before any compute
        for name, values in checked.items():
            if method in _SWEEP_METHODS[name]:
                for swept in values:
                    kw = _run_settings(method, settings, SWEEPS[name](swept))
                    resolve_settings(method, model.solver_defaults, dtype, **kw)
        resolve_settings(
            method, model.solver_defaults, dtype, **_run_settings(method, settings, {})
        )
    ref_settings = {**_REFERENCE, **(reference or {})}
    if noise is None:
        with torch.no_grad():
            noise = model.sample_noise(model.inject(x), generator)
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        ref_model, rx, ry, rnoise = _reference_model(model, x, y, noise, float64)
        ref = estimate_gradient(ref_model, rx, ry, "implicit", noise=rnoise, **ref_settings)
        if ref.state is None or ref.adjoint is None:
            raise ConfigurationError("the reference estimate returned no state")
        ref_state, ref_adjoint = ref.state, ref.adjoint
        problem = prepare(ref_model, rx, ry, noise=rnoise)
        lin = Linearization(problem.force, ref_state, ref_model.jvp_mode)
        gen = torch.Generator(device=ref_state.device).manual_seed(0)
        v = torch.randn(
            ref_state.shape, generator=gen, dtype=ref_state.dtype, device=ref_state.device
        )
        jv = lin.jvp(v)
        asymmetry = float(per_sample_norm(jv - lin.vjp(v)).norm() / per_sample_norm(jv).norm())
        groups = _groups(model)
        bptt_cache: dict[int, dict[str, torch.Tensor]] = {}

        def bptt_grads(t1: int) -> dict[str, torch.Tensor]:
            if t1 not in bptt_cache:
                kw = {k: v for k, v in settings.items() if k in ("step_size", "check_every")}
                est = estimate_gradient(model, x, y, "bptt", noise=noise, steps=t1, **kw)
                bptt_cache[t1] = est.grads
            return bptt_cache[t1]

        rows: list[ProbeRow] = []
        for method in methods:
            runs: list[tuple[str | None, float | None, dict[str, Any]]] = [(None, None, {})]
            for name, values in checked.items():
                if method in _SWEEP_METHODS[name]:
                    runs += [(name, value, SWEEPS[name](value)) for value in values]
            for sweep, value, override in runs:
                kw = _run_settings(method, settings, override)
                est = estimate_gradient(model, x, y, method, noise=noise, nonfinite="skip", **kw)
                steps, max_steps = est.settings["steps"], est.settings["max_steps"]
                t1 = steps if isinstance(steps, int) else max_steps
                if not isinstance(t1, int):
                    raise ConfigurationError(f"max_steps must be an int; got {t1!r}")
                g_bptt = bptt_grads(t1) if bptt else None
                adj_err = None
                if est.adjoint is not None:
                    lam = ref_adjoint.double().cpu().reshape(-1)
                    adj_err = _rel(est.adjoint.double().cpu().reshape(-1), lam)
                for group, names in groups.items():
                    g_ref = _flat(ref.grads, names)
                    rows.append(
                        _row(
                            method,
                            sweep,
                            value,
                            group,
                            est,
                            g_ref,
                            names,
                            ref=ref,
                            adj_err=adj_err,
                            g_bptt=g_bptt,
                            t1=t1,
                        )
                    )
        caught = [f"{w.category.__name__}: {w.message}" for w in log]
    return ProbeReport(
        rows=rows,
        model={
            "class": type(model).__name__,
            "describe": model.describe(),
            "config": model.config(),
            "fingerprint": model_fingerprint(model),
            "dtype": str(next(model.parameters()).dtype),
        },
        settings=dict(settings),
        reference={
            **ref_settings,
            "float64": float64,
            "converged": ref.converged(),
            "res_free": _worst(ref.stats["free"].final_residual),
            "res_adjoint": _worst(ref.stats["adjoint"].final_residual),
        },
        asymmetry=asymmetry,
        sweeps=checked,
        warnings=caught,
    )
