r"""Statistics: how one step's gradients become noise and signal (``statistic=``), in a registry.

A :class:`Statistic` is the description the scaler needs of a statistic, and nothing else: its
name, how many observations a tensor needs before its estimate exists (``min_count``), whether
``statistics()`` reports it per coordinate, what it needs from the training loop (backward hooks,
the model's modules, explicit micro-batches), the units it accepts, its checkpoint keys and how
to build its per-device state (a :class:`~gradstats.scaling._state.StatisticState`, which owns
the math: ``update`` / ``totals`` / ``tensor_state`` / ``load_tensor_state``).

Built in (:data:`STATISTICS`): ``"temporal"`` (``_temporal``), ``"same_point"``
(``_same_point``), ``"per_sample"`` (``_per_sample``) and the original implementation's
diagnostics ``"tensor_mean"``, ``"mixed"``, ``"spatial"`` (``_diagnostics``). A new statistic
is an object with these attributes, added with :func:`register_statistic`; a
:class:`StatisticSpec` fills the declarative fields for you.

``statistic="auto"`` (:data:`AUTO`, the default of :class:`~gradstats.scaling.ScalerConfig`) is
not a statistic but a choice made when the scaler is built (:func:`resolve_statistic`):
``"per_sample"`` when ``model=`` is given (exact same-point noise from one backward), else
``"same_point"`` (unbiased; needs ≥ 2 micro-batches or DDP ranks per step). It never resolves
to ``"temporal"``, which counts parameter drift as noise. The resolved name is what the
scaler's configuration, ``statistics()``, its reports and checkpoints hold.

>>> from gradstats.scaling import resolve_statistic
>>> resolve_statistic("auto", has_model=True), resolve_statistic("auto", has_model=False)
('per_sample', 'same_point')
>>> resolve_statistic("temporal", has_model=False)
'temporal'

>>> from gradstats.scaling import StatisticSpec, get_statistic
>>> temporal = get_statistic("temporal")
>>> temporal.min_count, temporal.per_coordinate, temporal.hooks, temporal.needs_model
(2, True, False, False)
>>> get_statistic("spatial").diagnostic
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.scaling._diagnostics import DIAGNOSTICS, DiagnosticState
from gradstats.scaling._per_sample import PerSampleState
from gradstats.scaling._same_point import SamePointState
from gradstats.scaling._state import StatisticState
from gradstats.scaling._temporal import TemporalState

__all__ = [
    "AUTO",
    "STATISTICS",
    "Statistic",
    "StatisticSettings",
    "StatisticSpec",
    "check_statistic_name",
    "get_statistic",
    "over_time",
    "register_statistic",
    "registered_statistics",
    "resolve_statistic",
    "statistic_choices",
    "takes_model",
]

AUTO = "auto"  # statistic="auto": resolved when the scaler is built (resolve_statistic)


class StatisticSettings(Protocol):
    """The configuration fields a statistic reads (:class:`~gradstats.scaling.ScalerConfig`)."""

    @property
    def statistic(self) -> str: ...
    @property
    def beta(self) -> float: ...
    @property
    def foreach(self) -> bool: ...


class Statistic(Protocol):
    """What the scaler knows of a statistic.

    Attributes:
        name: the ``statistic=`` value.
        min_count: observations a tensor needs before its estimate exists (temporal: 2, the
            unbiased variance needs two; same-point: 1, each step's estimate is unbiased).
        per_coordinate: ``statistics()`` reports noise and signal divided by the tensor's
            number of elements (means over coordinates), else as the state's totals.
        hooks: the state is fed by backward hooks between updates (it holds pending
            contributions; they are discarded when an update is refused).
        needs_model: the scaler needs ``model=`` (module hooks; ``per_sample``).
        micro_batches: ``VarianceGradientScaler.observe(grads)`` records explicit micro-batch
            gradients into the state (``same_point``).
        diagnostic: a legacy diagnostic that does not measure noise (the scaler warns).
        units: the ``unit=`` values it accepts (the first is the default, ``"sample"``).
    """

    @property
    def name(self) -> str: ...
    @property
    def min_count(self) -> int: ...
    @property
    def per_coordinate(self) -> bool: ...
    @property
    def hooks(self) -> bool: ...
    @property
    def needs_model(self) -> bool: ...
    @property
    def micro_batches(self) -> bool: ...
    @property
    def diagnostic(self) -> bool: ...
    @property
    def units(self) -> tuple[str, ...]: ...

    def make(
        self,
        tensors: list[torch.Tensor],
        config: StatisticSettings,
        distributed: bool,
        group: object,
    ) -> StatisticState:
        """A fresh (zero-count) state for ``tensors`` (all on one device)."""
        ...

    def state_keys(self, foreach: bool) -> tuple[str, ...]:
        """The per-tensor checkpoint keys its states load (``tensor_state`` may add more)."""
        ...


Factory = Callable[[list[torch.Tensor], StatisticSettings, bool, object], StatisticState]


@dataclass(frozen=True)
class StatisticSpec:
    """A :class:`Statistic` from a state factory and the declarative fields.

    Args:
        name, min_count, per_coordinate, hooks, needs_model, micro_batches, diagnostic, units:
            see :class:`Statistic`.
        factory: ``factory(tensors, config, distributed, group)`` -> the per-device state.
        keys: ``keys(foreach)`` -> the per-tensor checkpoint keys.
    """

    name: str
    factory: Factory
    keys: Callable[[bool], tuple[str, ...]]
    min_count: int
    per_coordinate: bool = True
    hooks: bool = False
    needs_model: bool = False
    micro_batches: bool = False
    diagnostic: bool = False
    units: tuple[str, ...] = ("sample",)

    def make(
        self,
        tensors: list[torch.Tensor],
        config: StatisticSettings,
        distributed: bool,
        group: object,
    ) -> StatisticState:
        return self.factory(tensors, config, distributed, group)

    def state_keys(self, foreach: bool) -> tuple[str, ...]:
        return self.keys(foreach)


_STATISTICS: dict[str, Statistic] = {}
_FIELDS = {
    "min_count": int, "per_coordinate": bool, "hooks": bool, "needs_model": bool,
    "micro_batches": bool, "diagnostic": bool, "units": tuple,
}  # fmt: skip


def register_statistic(statistic: Statistic) -> Statistic:
    """Add ``statistic`` to the registry under ``statistic.name`` (``statistic=`` accepts it).

    Raises:
        ConfigurationTypeError: a field is missing or of the wrong type.
        ConfigurationError: the name is taken by another statistic.
    """
    name = getattr(statistic, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigurationTypeError(f"a statistic needs a non-empty str name; got {name!r}")
    for field, kind in _FIELDS.items():
        if not isinstance(getattr(statistic, field, None), kind):
            raise ConfigurationTypeError(
                f"statistic {name!r} needs {field} of type {kind.__name__}; "
                f"got {getattr(statistic, field, None)!r}"
            )
    for method in ("make", "state_keys"):
        if not callable(getattr(statistic, method, None)):
            raise ConfigurationTypeError(f"statistic {name!r} has no {method}()")
    if name == AUTO:
        raise ConfigurationError(f"{AUTO!r} is reserved (statistic='auto' chooses a statistic)")
    if name in _STATISTICS and _STATISTICS[name] is not statistic:
        raise ConfigurationError(f"a statistic named {name!r} is already registered")
    _STATISTICS[name] = statistic
    return statistic


def registered_statistics() -> tuple[str, ...]:
    """The names ``statistic=`` accepts."""
    return tuple(_STATISTICS)


def statistic_choices() -> tuple[str, ...]:
    """The values ``statistic=`` accepts: ``"auto"`` and the registered names."""
    return (AUTO, *_STATISTICS)


def check_statistic_name(name: object) -> None:
    """A ConfigurationError naming the valid values unless ``statistic_choices()`` has ``name``."""
    if not isinstance(name, str) or name not in statistic_choices():
        valid = ", ".join(repr(s) for s in statistic_choices())
        raise ConfigurationError(f"statistic must be one of {valid}; got {name!r}")


def resolve_statistic(name: str, has_model: bool) -> str:
    """The statistic ``statistic=name`` stands for: ``"auto"`` -> ``"per_sample"`` with a model
    (``model=``), else ``"same_point"``; every other name is itself."""
    if name != AUTO:
        return name
    return _PER_SAMPLE.name if has_model else _SAME_POINT.name


def takes_model(name: object) -> bool:
    """Whether ``statistic=name`` uses ``model=``: ``"auto"`` (it then resolves to
    ``"per_sample"``) and statistics that need the modules; False for unknown names."""
    if name == AUTO:
        return True
    return isinstance(name, str) and name in _STATISTICS and _STATISTICS[name].needs_model


def over_time(name: str) -> bool:
    """Whether the statistic's noise is a variance over steps (an EMA window of the step
    sequence: ``"temporal"`` and the diagnostics), which counts parameter drift as noise —
    the statistics that must not drive ``rule="adascale"`` (at "no detectable signal" its gain
    goes to S)."""
    statistic = get_statistic(name)
    return statistic.name == "temporal" or statistic.diagnostic


def get_statistic(name: object) -> Statistic:
    """The registered statistic ``name``; a ConfigurationError naming the valid values if none.

    ``"auto"`` is refused here: it names no statistic until it is resolved
    (:func:`resolve_statistic`, ``ScalerConfig.resolved``), which ``VarianceGradientScaler``
    does.
    """
    if name == AUTO:
        raise ConfigurationError(
            "statistic='auto' is resolved when a VarianceGradientScaler is built ('per_sample' "
            "with model=, else 'same_point'); for init()/update() pass "
            "config.resolved(model) or a concrete statistic"
        )
    check_statistic_name(name)
    return _STATISTICS[name]  # type: ignore[index]


def _temporal(
    tensors: list[torch.Tensor], config: StatisticSettings, distributed: bool, group: object
) -> StatisticState:
    return TemporalState(tensors, config.beta, config.foreach)


def _same_point(
    tensors: list[torch.Tensor], config: StatisticSettings, distributed: bool, group: object
) -> StatisticState:
    return SamePointState(tensors, config.beta, distributed, group)


def _per_sample(
    tensors: list[torch.Tensor], config: StatisticSettings, distributed: bool, group: object
) -> StatisticState:
    return PerSampleState(tensors, config.beta, distributed, group)


def _diagnostic(
    tensors: list[torch.Tensor], config: StatisticSettings, distributed: bool, group: object
) -> StatisticState:
    return DiagnosticState(tensors, config.beta, config.statistic)


register_statistic(
    StatisticSpec("temporal", _temporal, TemporalState.state_keys, TemporalState.min_count)
)
_SAME_POINT = StatisticSpec(
    "same_point", _same_point, SamePointState.state_keys, SamePointState.min_count,
    hooks=True, micro_batches=True,
)  # fmt: skip
_PER_SAMPLE = StatisticSpec(
    "per_sample", _per_sample, PerSampleState.state_keys, PerSampleState.min_count,
    hooks=True, needs_model=True, units=("sample", "token"),
)  # fmt: skip
register_statistic(_SAME_POINT)
register_statistic(_PER_SAMPLE)
for _name in DIAGNOSTICS:
    _spec = StatisticSpec(
        _name, _diagnostic, DiagnosticState.state_keys, DiagnosticState.min_count,
        per_coordinate=False, diagnostic=True,
    )  # fmt: skip
    register_statistic(_spec)

STATISTICS: tuple[str, ...] = registered_statistics()  # the built-in ones
