r"""``ScalerState``: everything the variance gradient scaler carries, as one value.

The scaler is an init/update pair over this value, in the manner of optax's
``GradientTransformation`` (``init(params) -> state``, ``update(updates, state) -> state``);
:class:`~gradstats.VarianceGradientScaler` is a thin stateful shell around it that adds what a
training loop needs (backward hooks, the non-finite limit, the logger, applying the factor):

* :func:`init` ``(config, params) -> ScalerState`` — zero statistics, factor 1;
* :func:`~gradstats.scaling.observe` ``(state) -> Observation`` — validates and measures the
  current ``.grad`` (changes nothing);
* :func:`~gradstats.scaling.update` ``(state, observation, config) -> ScalerState`` — one step;
  the argument is left unchanged (its statistic buffers are copied: statistics fed by backward
  hooks, ``same_point`` and ``per_sample``, are updated in place only);
  :func:`~gradstats.scaling.update_` is the same step done in place (it consumes its
  argument; the scaler uses it so that the hot path copies nothing).

Checkpoints (``state_dict``) and reports (``statistics()``, the ``vgs/...`` metrics) are
functions of a ``ScalerState`` and the :class:`~gradstats.scaling.ScalerConfig`: they read its
public fields only.

Example (float64, ``temporal``: no hooks are needed by it, so the copying ``update`` works; the
default ``statistic="auto"`` is resolved only by the scaler, or by ``config.resolved(model)``):

>>> import torch
>>> from gradstats.scaling import ScalerConfig, init, observe, update
>>> model = torch.nn.Linear(3, 1).double()
>>> config = ScalerConfig(statistic="temporal", beta=0.9, confidence=None)
>>> state = init(config, model.named_parameters())
>>> for k in range(4):
...     model.zero_grad()
...     model(torch.randn(8, 3, dtype=torch.float64)).pow(2).mean().backward()
...     state = update(state, observe(state), config)
>>> state.updates, tuple(state.factor.shape)
(4, (1,))
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from gradstats.errors import ConfigurationError
from gradstats.scaling._factor import Aggregates, Factors
from gradstats.scaling._params import ParamLayout, layout_from
from gradstats.scaling._state import StatisticState
from gradstats.scaling._statistic import StatisticSettings, get_statistic

__all__ = ["AggregationSettings", "Readout", "ScalerState", "copy_state", "init"]

Readout = tuple[Aggregates, Factors]


class AggregationSettings(StatisticSettings, Protocol):
    """The configuration fields :func:`init` reads (besides the statistic's)."""

    @property
    def aggregate(self) -> str: ...


@dataclass(frozen=True, eq=False)
class ScalerState:
    r"""The scaler's state over one parameter layout (all tensors on the parameters' devices).

    Static (fixed by :func:`init`): ``layout`` (names, tensors, param groups, device blocks),
    ``shapes`` (the parameter shapes the statistics are for), ``group_index`` (the aggregate
    of each tensor: all 0 for ``aggregate="global"``, the param group, or the tensor) and
    ``groups`` (their number), ``global_index`` (all 0: the model-wide aggregate),
    ``distributed`` / ``process_group`` (same-point reduction).

    Per step:

    Attributes:
        statistics: one per-device state of the configured
            :class:`~gradstats.scaling.Statistic` per device block of ``layout`` (their
            ``tensor_state(j)`` is what a checkpoint stores for tensor j).
        updates: statistics updates so far, skipped ones included (a host int).
        nonfinite, consecutive, skipped: int64 device scalars — steps whose gradients held
            NaN/inf, the current run of them, steps dropped (non-finite or skipped by the caller).
        progress: the progress clock τ = Σ_t f_t over applied updates (float64 device scalar).
        factor: the factor of every aggregate (float64 ``[groups]``; the rate limit's memory).
        overall_factor: the model-wide factor (float64 ``[1]``; the same values as ``factor``
            for ``aggregate="global"``).
        factor_per_tensor: ``factor`` of each tensor's aggregate (float64 ``[tensors]``).
        present: which tensors had a gradient at the last update (bool ``[tensors]``).
        applied: whether the last update was applied (bool 0-dim).
        readout: ``(Aggregates, Factors)`` of the aggregates at the last refresh (ρ, gate
            states, n_eff...; None before the first); ``overall``: the same model-wide.
    """

    layout: ParamLayout
    shapes: tuple[tuple[int, ...], ...]
    group_index: torch.Tensor
    groups: int
    global_index: torch.Tensor
    statistics: tuple[StatisticState, ...]
    updates: int
    nonfinite: torch.Tensor
    consecutive: torch.Tensor
    skipped: torch.Tensor
    progress: torch.Tensor
    factor: torch.Tensor
    overall_factor: torch.Tensor
    factor_per_tensor: torch.Tensor
    present: torch.Tensor
    applied: torch.Tensor
    readout: Readout | None = None
    overall: Readout | None = None
    distributed: bool = False
    process_group: object = None
    # constant index tensors, built once per pattern of present gradients (not state)
    cache: dict[object, object] = field(default_factory=dict, repr=False)

    @property
    def home(self) -> torch.device:
        """The device of the counters and the factor (the first device block's)."""
        return self.layout.devices[0]


def evolve(state: ScalerState, **changes: object) -> ScalerState:
    """``dataclasses.replace(state, **changes)`` for the per-step path: the same new state
    (every other field shared, no ``__init__`` re-run: a ScalerState has no checks of its own)
    in a few dict operations instead of one ``getattr`` and keyword per field."""
    unknown = changes.keys() - _FIELDS
    if unknown:
        raise TypeError(f"ScalerState has no field(s) {sorted(unknown)}")
    new = object.__new__(ScalerState)
    new.__dict__.update(state.__dict__)
    new.__dict__.update(changes)
    return new


_FIELDS = frozenset(ScalerState.__dataclass_fields__)


def init(
    config: AggregationSettings,
    params: ParamLayout | object,
    *,
    distributed: bool = False,
    process_group: object = None,
) -> ScalerState:
    """The initial state: zero statistics of ``config.statistic``, factor 1, counters 0.

    Args:
        config: a :class:`~gradstats.scaling.ScalerConfig`.
        params: a ``ParamLayout`` or anything ``VarianceGradientScaler`` accepts as ``params``
            (``model.named_parameters()``, tensors, param-group dicts).
        distributed, process_group: same-point estimation across DDP ranks.
    """
    layout = params if isinstance(params, ParamLayout) else layout_from(params, None)
    statistic = get_statistic(config.statistic)
    states = tuple(
        statistic.make(list(layout.tensors[start:stop]), config, distributed, process_group)
        for start, stop in layout.blocks
    )
    home = layout.devices[0]
    count = len(layout.names)
    if config.aggregate == "global":
        index, groups = [0] * count, 1
    elif config.aggregate == "tensor":
        index, groups = list(range(count)), count
    else:
        index, groups = list(layout.group_of), layout.groups
    zero = torch.zeros((), dtype=torch.int64, device=home)
    factor = torch.ones(groups, dtype=torch.float64, device=home)
    return ScalerState(
        layout=layout,
        shapes=tuple(tuple(t.shape) for t in layout.tensors),
        group_index=torch.tensor(index, dtype=torch.int64, device=home),
        groups=groups,
        global_index=torch.zeros(count, dtype=torch.int64, device=home),
        statistics=states,
        updates=0,
        nonfinite=zero,
        consecutive=zero.clone(),
        skipped=zero.clone(),
        progress=torch.zeros((), dtype=torch.float64, device=home),
        factor=factor,
        overall_factor=torch.ones(1, dtype=torch.float64, device=home),
        factor_per_tensor=torch.ones(count, dtype=torch.float64, device=home),
        present=torch.zeros(count, dtype=torch.bool, device=home),
        applied=torch.zeros((), dtype=torch.bool, device=home),
        distributed=distributed,
        process_group=process_group,
    )


def copy_state(state: ScalerState, config: StatisticSettings) -> ScalerState:
    """A copy with new statistic buffers (the parameters, the process group and the constant
    index tensors are shared): updating it in place leaves ``state`` as it was.

    Copies through the statistics' persistence interface — a fresh ``make`` that loads every
    tensor's ``tensor_state`` — so it holds exactly what a checkpoint holds, and nothing that
    backward hooks recorded since the last update: statistics fed by hooks are refused.

    Raises:
        ConfigurationError: the statistic is fed by backward hooks (``same_point``,
            ``per_sample``).
    """
    statistic = get_statistic(config.statistic)
    if statistic.hooks:
        raise ConfigurationError(
            f"statistic={statistic.name!r} is fed by backward hooks between updates, which a "
            "copy of its state cannot carry: update it in place (VarianceGradientScaler, or "
            "gradstats.scaling.update_) instead of with the copying update()"
        )
    copies = []
    for old, (start, stop) in zip(state.statistics, state.layout.blocks, strict=True):
        tensors = list(state.layout.tensors[start:stop])
        new = statistic.make(tensors, config, state.distributed, state.process_group)
        new.beta = old.beta
        for j in range(stop - start):
            new.load_tensor_state(j, old.tensor_state(j))
        copies.append(new)
    return replace(state, statistics=tuple(copies))
