"""Settings of a solve or an estimate: one place for defaults, one resolution order.

Resolution: an explicit argument > the model's ``solver_defaults`` > the library defaults below.
Tolerances default by dtype (a float32 state cannot reach a float64 tolerance). Every value is
validated before anything runs; errors name the argument and the valid values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict, TypeVar

import torch

from gradstats._validation import check_choice, check_positive_int
from gradstats.eqprop._module import METHODS
from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = [
    "LIBRARY_DEFAULTS",
    "SETTING_KEYS",
    "Settings",
    "check_float",
    "required",
    "resolve_settings",
]

#: Library defaults; ``tol`` and ``tol_adjoint`` are per dtype, ``beta`` per method.
LIBRARY_DEFAULTS: dict[str, object] = {
    "step_size": 0.5,
    "tol": {torch.float64: 1e-9, torch.float32: 1e-5, "other": 1e-3},
    "tol_adjoint": {torch.float64: 1e-8, torch.float32: 1e-4, "other": 1e-2},
    "max_steps": 1000,
    "max_steps_adjoint": 1000,
    "check_every": 10,
    "anderson": 0,
    "adjoint_solver": "richardson",
    "gmres_restart": 20,
    "freeze": True,
    "divergence_factor": 1e6,
    "stall_checks": 20,
    "beta": {"ep": 0.01, "ep_symmetric": 0.05, "aep": 0.05, "holomorphic": 0.1},
    "points": 4,
    "anchor": "tracking",
    "correction": True,
    "steps": None,  # None: the same as max_steps
}
SETTING_KEYS = tuple(LIBRARY_DEFAULTS)
T = TypeVar("T")
_NUDGED = ("ep", "ep_symmetric", "aep", "holomorphic")
#: Settings that only some methods use: passing one explicitly to another method is an error.
_APPLIES_TO = {
    "beta": _NUDGED,
    "points": ("holomorphic",),
    "anchor": ("aep", "holomorphic"),
    "correction": ("holomorphic",),
    "steps": ("bptt",),
}


class FreePhaseOptions(TypedDict):
    """The keyword arguments of :func:`~gradstats.eqprop.fixed_point` a free phase takes from
    its :class:`Settings` (one place, so callers do not forward them one by one)."""

    step_size: float
    tol: float
    max_steps: int
    check_every: int
    anderson: int
    freeze: bool
    divergence_factor: float
    stall_checks: int


@dataclass(frozen=True)
class Settings:
    """Resolved settings of one estimate (see :func:`~gradstats.eqprop.estimate_gradient`)."""

    method: str
    step_size: float
    tol: float
    tol_adjoint: float
    max_steps: int
    max_steps_adjoint: int
    check_every: int
    anderson: int
    adjoint_solver: str
    gmres_restart: int
    freeze: bool
    divergence_factor: float
    stall_checks: int
    beta: float | None
    points: int | None
    anchor: str | None
    correction: bool | None
    steps: int | None

    def as_dict(self) -> dict[str, object]:
        """The settings as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)

    def free_phase_options(self) -> FreePhaseOptions:
        """``fixed_point(fn, z0, **settings.free_phase_options())`` relaxes a free phase."""
        return FreePhaseOptions(
            step_size=self.step_size,
            tol=self.tol,
            max_steps=self.max_steps,
            check_every=self.check_every,
            anderson=self.anderson,
            freeze=self.freeze,
            divergence_factor=self.divergence_factor,
            stall_checks=self.stall_checks,
        )


def required(value: T | None, name: str, method: str) -> T:
    """``value`` of a setting that :func:`resolve_settings` always fills for ``method``."""
    if value is None:
        raise ConfigurationError(f"{name} is not set: method={method!r} needs it")
    return value


def check_float(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float if it is a finite real number > 0 (≥ 0 with ``allow_zero``)."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationTypeError(
            f"{name} must be a finite float {bound}; got {type(value).__name__}"
        )
    number = float(value)
    bad = math.isnan(number) or math.isinf(number) or number < 0
    if bad or (number == 0 and not allow_zero):
        raise ConfigurationError(f"{name} must be a finite float {bound}; got {value!r}")
    return number


def _by_dtype(table: Mapping[object, object], dtype: torch.dtype) -> object:
    real = torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype
    return table.get(real, table["other"])


def _check_defaults(source: str, values: Mapping[str, object]) -> None:
    if not isinstance(values, Mapping):
        raise ConfigurationTypeError(
            f"{source} must be a mapping of settings; got {type(values).__name__}"
        )
    unknown = sorted(set(values) - set(SETTING_KEYS))
    if unknown:
        raise ConfigurationError(
            f"{source} has unknown setting(s) {unknown}; valid: {', '.join(SETTING_KEYS)}"
        )


def resolve_settings(
    method: str, model_defaults: Mapping[str, object], dtype: torch.dtype, **explicit: object
) -> Settings:
    """Resolve and validate the settings of ``method`` (explicit > model > library).

    ``explicit`` holds the caller's arguments; ``None`` means "not given".
    """
    check_choice("method", method, METHODS)
    _check_defaults("the model's solver_defaults", model_defaults)
    _check_defaults("estimate_gradient", explicit)
    given = {k: v for k, v in explicit.items() if v is not None}
    for key, methods in _APPLIES_TO.items():
        if key in given and method not in methods:
            raise ConfigurationError(
                f"{key} does not apply to method={method!r}; it is used by "
                f"{', '.join(repr(m) for m in methods)}"
            )
    merged: dict[str, object] = {**LIBRARY_DEFAULTS, **model_defaults, **given}
    for key in ("tol", "tol_adjoint"):
        table = merged[key]
        if isinstance(table, Mapping):
            merged[key] = _by_dtype(table, dtype)
    betas = merged["beta"]
    if isinstance(betas, Mapping):
        merged["beta"] = betas.get(method) if method in _NUDGED else None
    step_size = check_float("step_size", merged["step_size"])
    tol = check_float("tol", merged["tol"], allow_zero=True)
    tol_adjoint = check_float("tol_adjoint", merged["tol_adjoint"], allow_zero=True)
    max_steps = check_positive_int("max_steps", merged["max_steps"])
    max_adj = check_positive_int("max_steps_adjoint", merged["max_steps_adjoint"])
    check_every = check_positive_int("check_every", merged["check_every"])
    anderson = check_positive_int("anderson", merged["anderson"], minimum=0)
    adjoint_solver = check_choice(
        "adjoint_solver", merged["adjoint_solver"], ("richardson", "gmres")
    )
    restart = check_positive_int("gmres_restart", merged["gmres_restart"])
    freeze = merged["freeze"]
    if not isinstance(freeze, bool):
        raise ConfigurationTypeError(f"freeze must be a bool; got {type(freeze).__name__}")
    divergence = check_float("divergence_factor", merged["divergence_factor"])
    if divergence <= 1:
        raise ConfigurationError(f"divergence_factor must be > 1; got {divergence}")
    stall_checks = check_positive_int("stall_checks", merged["stall_checks"], minimum=0)
    beta: float | None = None
    points: int | None = None
    anchor: str | None = None
    correction: bool | None = None
    steps: int | None = None
    if method in _NUDGED:
        name = "beta (the radius r for method='holomorphic')" if method == "holomorphic" else "beta"
        beta = check_float(name, merged["beta"])
    if method == "holomorphic":
        points = check_positive_int("points", merged["points"], minimum=2)
        given_correction = merged["correction"]
        if not isinstance(given_correction, bool):
            raise ConfigurationTypeError(
                f"correction must be a bool; got {type(given_correction).__name__}"
            )
        correction = given_correction
    if method == "aep" or (method == "holomorphic" and correction):
        anchor = check_choice("anchor", merged["anchor"], ("fixed", "tracking"))
    elif method == "holomorphic" and "anchor" in given:
        raise ConfigurationError("anchor applies only with correction=True (the AEP correction)")
    if method == "bptt":
        given_steps = merged["steps"]
        steps = max_steps if given_steps is None else check_positive_int("steps", given_steps)
    return Settings(
        method=method,
        step_size=step_size,
        tol=tol,
        tol_adjoint=tol_adjoint,
        max_steps=max_steps,
        max_steps_adjoint=max_adj,
        check_every=check_every,
        anderson=anderson,
        adjoint_solver=adjoint_solver,
        gmres_restart=restart,
        freeze=freeze,
        divergence_factor=divergence,
        stall_checks=stall_checks,
        beta=beta,
        points=points,
        anchor=anchor,
        correction=correction,
        steps=steps,
    )
