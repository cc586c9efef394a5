"""The estimator registry: one :class:`Estimator` object per method, the one home of its knowledge.

Each estimator module (``_estimators/implicit.py``, ``bptt.py``, ``ep.py``, ``aep.py``,
``holo.py``) declares its :class:`Estimator` next to the function that computes it: the phases
it runs, the dataclass of the settings only it accepts (beyond the shared
:class:`~gradstats.eqprop.SolverSettings`), the models it supports, the probe sweeps that vary
it, what the run-level step counts T1/T2 set, and whether the trainer offers it. The package
``gradstats.eqprop._estimators`` registers them, in the order of :data:`METHODS`;
``estimate_gradient``, the settings resolution, the probe, ``diagnose``, the trainer and the
command line all read this registry instead of keeping their own method lists.

Vocabulary (one meaning per name): **T1** is the free phase's step count — the trainer's and
probe CLI's ``t1`` option and the probe's ``"T1"`` sweep; it sets :attr:`Estimator.t1_keys`
(``max_steps``, a cap; for ``bptt`` also ``steps``, exact). **T2** is the nudged/adjoint
phase's step cap — ``t2`` / ``"T2"``; it sets :attr:`Estimator.t2_keys`
(``max_steps_adjoint``; empty for ``bptt``, which has no second phase).

This module is a leaf: it imports no estimator, so the modules below ``estimate_gradient``
(``_module``, ``_settings``) may read the registry at call time without an import cycle. Read
it at import time only through ``gradstats.eqprop`` (which registers every estimator first).

>>> from gradstats.eqprop import ESTIMATORS, get_estimator
>>> list(ESTIMATORS)
['implicit', 'bptt', 'ep', 'ep_symmetric', 'aep', 'holomorphic']
>>> aep = get_estimator("aep")
>>> aep.phases, aep.option_names, aep.sweeps
(('free', 'nudged'), ('beta', 'anchor'), ('T2', 'beta', 'T1'))
>>> get_estimator("eqprop")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
gradstats.errors.ConfigurationError: method must be one of 'implicit', 'bptt', ...; got 'eqprop'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from gradstats._validation import check_choice
from gradstats.errors import ConfigurationError

__all__ = [
    "ESTIMATORS",
    "MODEL_KINDS",
    "SWEEP_AXES",
    "T1_KEY",
    "T2_KEY",
    "Estimator",
    "Options",
    "get_estimator",
    "model_kinds",
    "register",
]

#: Kinds of models: ``real`` (every model) and ``holomorphic`` (``holomorphic = True``: the
#: force and loss accept complex states analytically).
MODEL_KINDS = ("real", "holomorphic")
#: Probe sweep axes: what each varies (``T1``/``T2`` run exactly that many steps).
SWEEP_AXES: Mapping[str, str] = MappingProxyType(
    {
        "T2": "nudged/adjoint steps (run exactly: tol_adjoint=0)",
        "beta": "the nudge beta (holomorphic: the radius r)",
        "points": "holomorphic: the number N of nudges",
        "T1": "free-phase steps (run exactly: tol=0; bptt unrolls the same T1)",
    }
)
_INTEGER_AXES = ("T2", "points", "T1")
#: The settings T1 and T2 cap for every estimator that has the phase (``t1``/``t2``, "T1"/"T2").
T1_KEY, T2_KEY = "max_steps", "max_steps_adjoint"


@dataclass(frozen=True)
class Options:
    """Base of an estimator's own settings dataclass (``None``: not given, use the default).

    A subclass lists the settings only its estimators accept as fields and resolves them in
    :meth:`resolve` (validated values, defaults filled in).
    """

    #: Library defaults of the fields (an estimator may override some, e.g. its ``beta``).
    DEFAULTS: ClassVar[Mapping[str, object]] = MappingProxyType({})

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings this dataclass holds, in field order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def select(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The subset of ``settings`` (already limited to accepted names) that applies."""
        return dict(settings)

    @classmethod
    def resolve(
        cls, method: str, merged: Mapping[str, object], given: Mapping[str, object], max_steps: int
    ) -> Options:
        """Validated options from ``merged`` (explicit > model > library); ``given``: explicit."""
        return cls()

    def given(self) -> dict[str, object]:
        """The fields that are set (not ``None``), as keyword arguments."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Estimator:
    """One gradient estimator: what it computes, what it needs and what it accepts.

    Attributes:
        name: the ``method=`` value.
        estimate: the adjoint estimate it uses (one line, for tables and help texts).
        exact_when: when it is exact.
        compute: ``compute(problem, settings) -> (state, adjoint, grads, loss, stats)``;
            ``adjoint`` is ``None`` for estimators that return ``grads`` themselves (``bptt``),
            ``grads``/``loss`` are ``None`` when ``estimate_gradient`` assembles them from the
            adjoint (g = aᵀ ∂F/∂θ + ∂L/∂θ).
        options: the dataclass of the settings only this estimator accepts (an
            :class:`Options` subclass); every estimator also accepts the shared
            :class:`~gradstats.eqprop.SolverSettings`.
        phases: the keys of ``GradientEstimate.stats`` it fills, free phase first.
        model_kinds: the kinds of models it runs on (:data:`MODEL_KINDS`).
        sweeps: the probe sweeps that vary it (:data:`SWEEP_AXES`).
        t1_keys: the settings the free-phase step count T1 sets.
        t2_keys: the settings the nudged/adjoint step cap T2 sets (empty: no second phase).
        defaults: this estimator's own library defaults of its options (e.g. ``beta``).
        train_rank: position in the trainer's ``--method`` list (``None``: not offered).
    """

    name: str
    estimate: str
    exact_when: str
    compute: Callable[..., Any] = dataclasses.field(repr=False, compare=False)
    options: type[Options] = Options
    phases: tuple[str, ...] = ("free",)
    model_kinds: tuple[str, ...] = MODEL_KINDS
    sweeps: tuple[str, ...] = ("T1",)
    t1_keys: tuple[str, ...] = (T1_KEY,)
    t2_keys: tuple[str, ...] = ()
    defaults: Mapping[str, object] = dataclasses.field(default_factory=dict)
    train_rank: int | None = None

    @property
    def option_names(self) -> tuple[str, ...]:
        """The settings only this estimator accepts (the fields of :attr:`options`)."""
        return self.options.names()

    @property
    def nudged(self) -> bool:
        """Whether it relaxes nudged phases (and so takes a nudge ``beta``)."""
        return "beta" in self.option_names

    @property
    def second_phase(self) -> str | None:
        """``"adjoint"``/``"nudged"``: the phase after the free one (``None``: none)."""
        return self.phases[1] if len(self.phases) > 1 else None

    def shares_nudge(self, other: Estimator) -> bool:
        """Whether a β given for ``other`` means the same for this one: both offered by the
        trainer and nudged the same way (real two-point nudges, or a holomorphic radius r)."""
        offered = self.train_rank is not None and other.train_rank is not None
        same = self.model_kinds == other.model_kinds
        return offered and same and self.nudged and other.nudged

    def option_defaults(self) -> dict[str, object]:
        """Library defaults of :attr:`options`, with this estimator's own :attr:`defaults`."""
        return {**self.options.DEFAULTS, **self.defaults}

    def supports(self, model: object) -> bool:
        """Whether the kind of ``model`` is one this estimator runs on (its own restrictions,
        e.g. a mode, come from ``model.supported_methods()``)."""
        return any(kind in self.model_kinds for kind in model_kinds(model))

    def select(self, settings: Mapping[str, Any], shared: Iterable[str]) -> dict[str, Any]:
        """The entries of ``settings`` this estimator accepts (shared names or its options)."""
        names = set(shared) | set(self.option_names)
        return self.options.select({k: v for k, v in settings.items() if k in names})

    def sweep_settings(self, axis: str, value: float) -> dict[str, Any]:
        """The settings one value of the probe sweep ``axis`` sets for this estimator."""
        check_choice("sweeps", axis, tuple(SWEEP_AXES))
        if axis not in self.sweeps:
            raise ConfigurationError(f"sweep {axis!r} does not apply to method={self.name!r}")
        if axis == "T1":
            return {**dict.fromkeys(self.t1_keys, int(value)), "tol": 0.0}
        if axis == "T2":
            return {**dict.fromkeys(self.t2_keys, int(value)), "tol_adjoint": 0.0}
        return {axis: int(value) if axis in _INTEGER_AXES else float(value)}


def model_kinds(model: object) -> tuple[str, ...]:
    """The kinds of ``model``: ``("real",)``, or ``("real", "holomorphic")``."""
    return MODEL_KINDS if getattr(model, "holomorphic", False) else MODEL_KINDS[:1]


_REGISTRY: dict[str, Estimator] = {}
#: ``{name: Estimator}`` of every registered estimator (read-only; order of :data:`METHODS`).
ESTIMATORS: Mapping[str, Estimator] = MappingProxyType(_REGISTRY)


def register(*estimators: Estimator) -> None:
    """Add estimators to :data:`ESTIMATORS` (in the given order); a name may appear once."""
    for estimator in estimators:
        if not isinstance(estimator, Estimator):
            raise ConfigurationError(f"register takes Estimator objects; got {estimator!r}")
        if estimator.name in _REGISTRY:
            raise ConfigurationError(f"an estimator named {estimator.name!r} is registered")
        _REGISTRY[estimator.name] = estimator


def get_estimator(name: str) -> Estimator:
    """The registered estimator ``name``.

    Raises:
        ConfigurationError: ``name`` is not registered (the message lists the valid names).
    """
    check_choice("method", name, tuple(_REGISTRY))
    return _REGISTRY[name]
