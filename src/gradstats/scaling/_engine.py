r"""One step of the scaler as functions of a :class:`~gradstats.scaling.ScalerState`.

One update is two phases, so that a failing call changes nothing:

1. :func:`observe` validates the gradients (no sparse gradient, every parameter still has the
   shape and device the state was built for) and computes their squared norms ‖g_j‖² and the
   step's finiteness on the device. It changes no state: a statistic that computes its step
   from the same pass (the temporal statistic's one-pass native kernel) writes it into spare
   buffers that only :func:`update_` makes current.
2. :func:`update` (or in place :func:`update_`) feeds the observation to the statistics (a
   non-finite or user-skipped step is dropped on the device), advances the counters —
   ``nonfinite`` += [step non-finite], ``consecutive`` = 0 if finite else ``consecutive`` + 1,
   ``skipped`` += [step dropped], all int64 device scalars — recomputes ρ and the factor
   (:func:`refresh`) and advances the progress clock τ += f (0 for a dropped step).

No host sync anywhere here. AMP: an :class:`Observation` may carry the inverse loss scale 1/S,
for gradients that still carry it (``scaled=True``) and for what backward hooks recorded (always
scaled under AMP).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from operator import attrgetter, is_not
from typing import Any, cast

import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError, StateError
from gradstats.scaling._config import ScalerConfig
from gradstats.scaling._factor import FactorSettings, aggregate, scaling_factor
from gradstats.scaling._kernels import squared_norms
from gradstats.scaling._nonfinite import check_skip
from gradstats.scaling._rules import constant_factor, make_rule
from gradstats.scaling._scaler_state import ScalerState, copy_state, evolve
from gradstats.scaling._state import Totals
from gradstats.scaling._statistic import get_statistic

__all__ = [
    "Observation",
    "acceptable",
    "check_parameters",
    "discard_pending",
    "observe",
    "refresh",
    "totals",
    "update",
    "update_",
]


@dataclass(frozen=True)
class Observation:
    """The validated gradients of one step, per device block, and how to apply them.

    Attributes:
        grads, sq_norms, masks: per device block, the ``.grad`` tensors (None: no gradient),
            their squared norms ‖g_j‖² (float64, unscaled) and which tensors have one.
        finite: 0-dim bool on the home device: every gradient is finite.
        skip: None, a bool or a 0-dim tensor (non-zero: drop this step, counted).
        grad_inv: 1/S when ``.grad`` still carries an AMP loss scale S, else None.
        hook_inv: 1/S when backward hooks recorded scaled contributions, else None.
        prepared: per device block, what the statistic computed ahead from the same pass
            over the gradients (its ``measure``: the temporal statistic's one-pass native
            step, whose new means wait in spare buffers), or None. A statistic uses it in
            :func:`update_` only if nothing changed its state since.
    """

    grads: tuple[list[torch.Tensor | None], ...]
    sq_norms: tuple[torch.Tensor, ...]
    masks: tuple[torch.Tensor, ...]
    finite: torch.Tensor
    skip: torch.Tensor | bool | None = None
    grad_inv: torch.Tensor | None = None
    hook_inv: torch.Tensor | None = None
    prepared: tuple[Any, ...] = ()


_SHAPE, _DEVICE = attrgetter("shape"), attrgetter("device")
_IS_SPARSE, _PRESENT = attrgetter("is_sparse"), functools.partial(is_not, None)


def _mask(
    state: ScalerState, block: int, present: tuple[bool, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    key = (block, present)
    if key not in state.cache:
        rows = [j for j, p in enumerate(present) if p]
        state.cache[key] = (
            torch.tensor(rows, dtype=torch.int64, device=device),
            torch.tensor(present, dtype=torch.bool, device=device),
        )
    return cast("tuple[torch.Tensor, torch.Tensor]", state.cache[key])


def check_parameters(state: ScalerState) -> None:
    """Raise a StateError if a parameter's shape or device changed since the state was built
    (the state would no longer fit it; ``rebind`` rebuilds it). Metadata only: one comparison
    of every tensor's (shape, device) with the layout's, then the detailed search on a
    mismatch."""
    layout = state.layout
    expected = state.cache.get("signature")
    if expected is None:
        expected = state.cache["signature"] = [
            (shape, layout.devices[b])
            for b, (start, stop) in enumerate(layout.blocks)
            for shape in state.shapes[start:stop]
        ]
    tensors = layout.tensors
    if list(zip(map(_SHAPE, tensors), map(_DEVICE, tensors), strict=True)) == expected:  # in C
        return
    for b, (start, stop) in enumerate(layout.blocks):
        for j in range(start, stop):
            tensor, name = layout.tensors[j], layout.names[j]
            if tuple(tensor.shape) != state.shapes[j]:
                raise StateError(
                    f"parameter {name!r} now has shape {tuple(tensor.shape)} but the scaler's "
                    f"statistics are for shape {state.shapes[j]}; call rebind(params) after "
                    "changing parameters"
                )
            if tensor.device != layout.devices[b]:
                raise StateError(
                    f"parameter {name!r} moved to {tensor.device} but the scaler's statistics "
                    f"live on {layout.devices[b]}; call rebind(params) after moving the model"
                )


def _inverse(loss_scale: torch.Tensor | float, home: torch.device) -> torch.Tensor:
    """1/S as a float64 scalar on ``home`` (a device tensor is divided on the device)."""
    if isinstance(loss_scale, torch.Tensor):
        if loss_scale.numel() != 1 or not (loss_scale.is_floating_point()):
            raise ConfigurationError(
                f"loss_scale must be a one-element floating tensor; got shape "
                f"{tuple(loss_scale.shape)}, dtype {loss_scale.dtype}"
            )
        return loss_scale.reshape(()).to(device=home, dtype=torch.float64).reciprocal()
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)):
        raise ConfigurationTypeError(
            f"loss_scale must be a tensor or a number; got {type(loss_scale).__name__}"
        )
    if not 0 < loss_scale < float("inf"):
        raise ConfigurationError(f"loss_scale must be finite and > 0; got {loss_scale!r}")
    return torch.full((), 1.0 / loss_scale, dtype=torch.float64, device=home)


def observe(
    state: ScalerState,
    *,
    skip: torch.Tensor | bool | None = None,
    loss_scale: torch.Tensor | float | None = None,
    scaled: bool = False,
) -> Observation:
    """Validate the current ``.grad`` of every tracked tensor and measure it (changes no state).

    Args:
        state: the state whose ``layout`` names the tensors.
        skip: drop this step (counted in ``skipped``): a bool or a 0-dim tensor (AMP's
            ``found_inf`` works).
        loss_scale: the AMP loss scale S of this step (a device tensor: no sync), if any;
            backward-hook observations are divided by it.
        scaled: ``.grad`` still carries S (``unscale_`` has not run); needs ``loss_scale``.
    """
    check_skip(skip)
    if scaled and loss_scale is None:
        raise ConfigurationError("scaled=True needs the loss scale the gradients carry")
    check_parameters(state)
    layout, home = state.layout, state.home
    everything = layout.grads()
    if any(map(_IS_SPARSE, filter(_PRESENT, everything))):  # (in C: every step)
        raise ConfigurationError("sparse gradients are not supported by VarianceGradientScaler")
    hook_inv = None if loss_scale is None else _inverse(loss_scale, home)
    grad_inv = hook_inv if scaled else None
    grads_out, sq_out, mask_out, prepared_out = [], [], [], []
    finite: torch.Tensor | None = None
    for b, (start, stop) in enumerate(layout.blocks):
        grads = everything[start:stop]
        present = tuple(map(_PRESENT, grads))
        rows, mask = _mask(state, b, present, layout.devices[b])
        prepared = None
        if all(present):  # the common case: no scatter into a zero vector
            measure = getattr(state.statistics[b], "measure", None)
            if measure is not None:
                inv = None if grad_inv is None else grad_inv.to(layout.devices[b])
                prepared = measure(grads, inv)
            sq = (
                squared_norms(cast("list[torch.Tensor]", grads))
                if prepared is None
                else prepared.sq_norms
            )
        else:
            sq = torch.zeros(stop - start, dtype=torch.float64, device=layout.devices[b])
            if any(present):
                sq = sq.index_copy(0, rows, squared_norms([g for g in grads if g is not None]))
        # NaN/inf in any gradient makes its ‖g‖², and so the sum, non-finite; x − x == 0
        # holds exactly for finite x (inf − inf and NaN − NaN are NaN): isfinite in 2 ops
        total = sq.sum()
        ok = ((total - total) == 0).to(home)
        finite = ok if finite is None else finite & ok
        grads_out.append(grads)
        sq_out.append(sq)
        mask_out.append(mask)
        prepared_out.append(prepared)
    assert finite is not None  # a layout has at least one block
    return Observation(
        tuple(grads_out), tuple(sq_out), tuple(mask_out), finite, skip, grad_inv, hook_inv,
        tuple(prepared_out),
    )  # fmt: skip


def update_(
    state: ScalerState, observation: Observation, config: ScalerConfig, *, readout: bool = True
) -> ScalerState:
    """One step, done in place: ``state``'s statistic buffers become the new state's (do not
    use ``state`` afterwards). No host sync.

    ``readout=False`` (only where :func:`~gradstats.scaling._rules.constant_factor` holds: the
    factor is 1 whatever the statistics) sets the factors to 1 and leaves ``readout`` /
    ``overall`` as they were: :func:`refresh` forms them when they are read, with the values
    this update would have given (they depend on the statistics, ``present`` and ``updates``
    only). The scaler does this for its default rule; about 100 small ops saved per step."""
    home, skip = state.home, observation.skip
    finite = observation.finite
    apply = finite
    if skip is True:  # a fill on the device, not a host-to-device copy
        apply = apply & torch.zeros((), dtype=torch.bool, device=home)
    elif isinstance(skip, torch.Tensor):
        apply = apply & ~skip.to(device=home, dtype=torch.bool)
    known = _host_flags(finite, apply)
    known_apply = known is not None and known[1]
    grad_inv, hook_inv = observation.grad_inv, observation.hook_inv
    prepared = observation.prepared or (None,) * len(state.statistics)
    for grads, sq, mask, statistic, device, ahead in zip(
        observation.grads,
        observation.sq_norms,
        observation.masks,
        state.statistics,
        state.layout.devices,
        prepared,
        strict=True,
    ):
        take = mask if known_apply else mask & apply.to(device)
        if grad_inv is not None:
            sq = sq * grad_inv.to(device).square()
        extra = {} if ahead is None else {"prepared": ahead}
        statistic.update(grads, sq, take, grad_inv=grad_inv, hook_inv=hook_inv, **extra)
    masks = observation.masks
    present = masks[0] if len(masks) == 1 else torch.cat([m.to(home) for m in masks])
    if readout:
        fields = _readout_fields(state, config, present, state.updates + 1)
    else:
        if not constant_factor(config):
            raise RuntimeError("update_(readout=False) needs a rule whose factor is always 1")
        keys = ("factor", "factor_per_tensor", "overall_factor")
        fields = {key: torch.ones_like(getattr(state, key)) for key in keys}
    factor = fields["overall_factor"][0]  # the model-wide factor of this update
    if known is not None and known[0] and known[1]:  # CPU, finite and applied: the same values
        counters = {
            "nonfinite": state.nonfinite,
            "consecutive": torch.zeros_like(state.consecutive),  # fresh: no shared constant
            "skipped": state.skipped,
            "progress": state.progress + factor,
        }
    else:
        bad = ~finite
        counters = {  # int64 with bool promotes to int64 (no cast)
            "nonfinite": state.nonfinite + bad,
            "consecutive": (state.consecutive + 1) * bad,  # 0 after a finite step
            "skipped": state.skipped + ~apply,
            "progress": state.progress + torch.where(apply, factor, 0.0),
        }
    return evolve(
        state, present=present, applied=apply, updates=state.updates + 1, **counters, **fields
    )


def _host_flags(finite: torch.Tensor, apply: torch.Tensor) -> tuple[bool, bool] | None:
    """(finite, applied) read on the host where the state lives on the CPU (a read waits for
    nothing there; it saves the counters' small ops on the common step), else None."""
    if finite.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    ok = bool(finite)  # sync-ok: CPU only
    return ok, ok if apply is finite else bool(apply)  # sync-ok: CPU only


def update(state: ScalerState, observation: Observation, config: ScalerConfig) -> ScalerState:
    r"""One step of the scaler: the new state after ``observation``; ``state`` is unchanged.

    Copies the statistic buffers of ``state`` first (what a checkpoint holds; O(state) memory
    and time, no host sync), then applies :func:`update_`. Statistics fed by backward hooks
    between updates (``same_point``, ``per_sample``) are refused with a ConfigurationError: a
    copy cannot carry what the hooks recorded; :class:`~gradstats.VarianceGradientScaler`
    installs the hooks and updates them in place (:func:`update_`).
    """
    return update_(copy_state(state, config), observation, config)


def totals(state: ScalerState) -> Totals:
    """The per-tensor noise, signal, counts... of every statistic state, on the home device."""
    return Totals.concatenated([s.totals() for s in state.statistics], state.home)


def refresh(state: ScalerState, config: ScalerConfig) -> ScalerState:
    """ρ and the factor of every aggregate recomputed from the statistics as they are now (one
    rate-limited move with ``max_rate``). No host sync."""
    return evolve(state, **_readout_fields(state, config, state.present, state.updates))


def _readout_fields(
    state: ScalerState, config: ScalerConfig, present: torch.Tensor, updates: int
) -> dict[str, Any]:
    """The fields :func:`refresh` sets, for the statistics of ``state`` with ``present`` and
    ``updates`` (those of the state being built: :func:`update_` sets everything at once)."""
    summed_totals = totals(state)
    min_count = get_statistic(config.statistic).min_count
    include = present & (summed_totals.count >= min_count)
    rule = state.cache.get("rule")
    if not (isinstance(rule, tuple) and rule[0] is config):  # built once per configuration
        rule = state.cache["rule"] = (config, make_rule(config))
    settings = FactorSettings(
        rule=rule[1], beta=config.beta, eps=config.eps,
        confidence=config.confidence, min_count=min_count,
        warm=updates > config.warmup_steps,
    )  # fmt: skip
    args = (summed_totals.noise, summed_totals.signal, summed_totals.count, include)
    summed = aggregate(*args, state.group_index, state.groups)
    result = scaling_factor(summed, state.factor, settings, max_rate=config.max_rate)
    readout = (summed, result)
    if config.aggregate == "global":
        overall = readout
    else:
        whole = aggregate(*args, state.global_index, 1)
        factors = scaling_factor(whole, state.overall_factor, settings, max_rate=config.max_rate)
        overall = (whole, factors)
    return {
        "factor": result.factor,
        "factor_per_tensor": result.factor.index_select(0, state.group_index),
        "overall_factor": overall[1].factor,
        "readout": readout,
        "overall": overall,
    }


def discard_pending(state: ScalerState, config: ScalerConfig) -> None:
    """Drop what backward hooks recorded for a step that will not be applied."""
    if not get_statistic(config.statistic).hooks:
        return
    for statistic in state.statistics:
        discard = getattr(statistic, "discard_pending", None)
        if callable(discard):
            discard()


def acceptable(observation: Observation) -> bool:
    """``nonfinite="raise"``: the gradients are finite, or the step is skipped anyway (one host
    read; never on the default path)."""
    ok, skip = observation.finite, observation.skip
    if isinstance(skip, bool):
        return skip or bool(ok)  # sync-ok: nonfinite="raise" decides on the host
    if skip is not None:
        ok = ok | skip.to(device=ok.device, dtype=torch.bool)
    return bool(ok)  # sync-ok: nonfinite="raise" decides on the host
