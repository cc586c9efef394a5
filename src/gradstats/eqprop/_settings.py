"""Settings of a solve or an estimate: one place for defaults, one resolution order.

The shared solver settings (:class:`SolverSettings`, defaults :data:`SOLVER_DEFAULTS`) are the
same for every estimator; each estimator's own settings are its registered options dataclass
(:mod:`gradstats.eqprop._registry`). Resolution: an explicit argument > the model's
``solver_defaults`` > the library defaults.
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
from gradstats.eqprop._registry import ESTIMATORS, Options, get_estimator
from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = [
    "SOLVER_DEFAULTS",
    "SOLVER_KEYS",
    "Settings",
    "SolverSettings",
    "check_float",
    "library_defaults",
    "required",
    "resolve_settings",
    "setting_keys",
]

#: Library defaults of the shared solver settings; ``tol`` and ``tol_adjoint`` are per dtype.
#: The estimators' own settings default in their :class:`~gradstats.eqprop.Estimator`.
SOLVER_DEFAULTS: dict[str, object] = {
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
}
#: The shared settings every estimator accepts (the fields of :class:`SolverSettings`).
SOLVER_KEYS = tuple(SOLVER_DEFAULTS)
T = TypeVar("T")


@dataclass(frozen=True)
class SolverSettings:
    """The solver settings every estimator shares, as one typed record (``None``: not given).

    What a caller (the trainer, the probe, the command line) passes instead of forwarding each
    keyword: ``estimate_gradient(model, x, y, method, solver=SolverSettings(max_steps=30))``.
    The meaning of each field is documented at :func:`~gradstats.eqprop.estimate_gradient`;
    unset fields resolve to the model's ``solver_defaults``, then :data:`SOLVER_DEFAULTS`.
    """

    step_size: float | None = None
    tol: float | None = None
    tol_adjoint: float | None = None
    max_steps: int | None = None
    max_steps_adjoint: int | None = None
    check_every: int | None = None
    anderson: int | None = None
    adjoint_solver: str | None = None
    gmres_restart: int | None = None
    freeze: bool | None = None
    divergence_factor: float | None = None
    stall_checks: int | None = None

    def given(self) -> dict[str, object]:
        """The fields that are set, as keyword arguments."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def replace(self, **changes: object) -> SolverSettings:
        """A copy with ``changes`` (``None`` unsets a field)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


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
    """Resolved settings of one estimate (see :func:`~gradstats.eqprop.estimate_gradient`):
    the shared solver values and the estimator's own :attr:`options`."""

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
    options: Options = dataclasses.field(default_factory=Options)

    def as_dict(self) -> dict[str, object]:
        """The settings as a plain flat dict (JSON-ready): every setting any estimator takes,
        ``None`` where it does not apply to this method."""
        out: dict[str, object] = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"
        }
        out.update(dict.fromkeys(_option_keys()))
        out.update(dataclasses.asdict(self.options))
        return out

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


def _option_keys() -> tuple[str, ...]:
    """Every estimator's own settings, first appearance in registry order."""
    names: dict[str, None] = {}
    for estimator in ESTIMATORS.values():
        names.update(dict.fromkeys(estimator.option_names))
    return tuple(names)


def setting_keys() -> tuple[str, ...]:
    """Every setting name ``estimate_gradient`` knows: the shared ones, then the estimators'."""
    return SOLVER_KEYS + tuple(k for k in _option_keys() if k not in SOLVER_KEYS)


def library_defaults() -> dict[str, object]:
    """The library defaults of every setting (per-method values as ``{method: value}``)."""
    out: dict[str, object] = dict(SOLVER_DEFAULTS)
    for key in _option_keys():
        per = {
            e.name: e.option_defaults()[key]
            for e in ESTIMATORS.values()
            if key in e.option_names and key in e.option_defaults()
        }
        values = list(per.values())
        out[key] = per if any(v != values[0] for v in values) else values[0]
    return out


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
    keys = setting_keys()
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ConfigurationError(
            f"{source} has unknown setting(s) {unknown}; valid: {', '.join(keys)}"
        )


def _shared(merged: Mapping[str, object]) -> dict[str, object]:
    """The shared solver values of ``merged``, validated."""
    divergence = check_float("divergence_factor", merged["divergence_factor"])
    if divergence <= 1:
        raise ConfigurationError(f"divergence_factor must be > 1; got {divergence}")
    freeze = merged["freeze"]
    if not isinstance(freeze, bool):
        raise ConfigurationTypeError(f"freeze must be a bool; got {type(freeze).__name__}")
    return {
        "step_size": check_float("step_size", merged["step_size"]),
        "tol": check_float("tol", merged["tol"], allow_zero=True),
        "tol_adjoint": check_float("tol_adjoint", merged["tol_adjoint"], allow_zero=True),
        "max_steps": check_positive_int("max_steps", merged["max_steps"]),
        "max_steps_adjoint": check_positive_int("max_steps_adjoint", merged["max_steps_adjoint"]),
        "check_every": check_positive_int("check_every", merged["check_every"]),
        "anderson": check_positive_int("anderson", merged["anderson"], minimum=0),
        "adjoint_solver": check_choice(
            "adjoint_solver", merged["adjoint_solver"], ("richardson", "gmres")
        ),
        "gmres_restart": check_positive_int("gmres_restart", merged["gmres_restart"]),
        "freeze": freeze,
        "divergence_factor": divergence,
        "stall_checks": check_positive_int("stall_checks", merged["stall_checks"], minimum=0),
    }


def resolve_settings(
    method: str, model_defaults: Mapping[str, object], dtype: torch.dtype, **explicit: object
) -> Settings:
    """Resolve and validate the settings of ``method`` (explicit > model > library).

    ``explicit`` holds the caller's arguments; ``None`` means "not given". A setting that only
    other estimators accept (see :attr:`Estimator.option_names
    <gradstats.eqprop.Estimator.option_names>`) is an error when given explicitly.
    """
    estimator = get_estimator(method)
    _check_defaults("the model's solver_defaults", model_defaults)
    _check_defaults("estimate_gradient", explicit)
    given = {k: v for k, v in explicit.items() if v is not None}
    for key in given:
        if key not in SOLVER_KEYS and key not in estimator.option_names:
            users = [e.name for e in ESTIMATORS.values() if key in e.option_names]
            raise ConfigurationError(
                f"{key} does not apply to method={method!r}; it is used by "
                f"{', '.join(repr(m) for m in users)}"
            )
    library = {**SOLVER_DEFAULTS, **estimator.option_defaults()}
    merged: dict[str, object] = {**library, **model_defaults, **given}
    for key in ("tol", "tol_adjoint"):
        table = merged[key]
        if isinstance(table, Mapping):
            merged[key] = _by_dtype(table, dtype)
    for key in estimator.option_names:  # a model may give per-method values: {method: value}
        value = merged.get(key)
        if isinstance(value, Mapping):
            merged[key] = value.get(method, library.get(key))
    shared = _shared(merged)
    max_steps = shared["max_steps"]
    assert isinstance(max_steps, int)  # checked by _shared
    options = estimator.options.resolve(method, merged, given, max_steps)
    return Settings(method=method, options=options, **shared)  # type: ignore[arg-type]
