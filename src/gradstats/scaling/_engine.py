r"""The scaler's device state over one parameter layout: statistics, counters and the factor.

:class:`ScalerEngine` owns everything a checkpoint holds and everything a report reads; the
public :class:`~gradstats.scaling.VarianceGradientScaler` drives it, and ``_checkpoint`` /
``_report`` are functions over it (none of them imports the scaler).

One update is two phases, so that a failing call changes nothing:

1. :meth:`ScalerEngine.observe` validates the gradients (no sparse gradient, every parameter
   still has the shape and device the state was built for) and computes their squared norms
   ‖g_j‖² and the step's finiteness on the device. It changes no state.
2. :meth:`ScalerEngine.apply` feeds the observation to the statistics (a non-finite or
   user-skipped step is dropped on the device) and advances the counters:
   ``nonfinite`` += [step non-finite], ``consecutive`` = 0 if finite else ``consecutive`` + 1,
   ``skipped`` += [step dropped] — all int64 device scalars, no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradstats.errors import ConfigurationError, StateError
from gradstats.scaling._config import ScalerConfig
from gradstats.scaling._diagnostics import DiagnosticState
from gradstats.scaling._factor import Aggregates, Factors, FactorSettings, aggregate, scaling_factor
from gradstats.scaling._kernels import squared_norms
from gradstats.scaling._params import ParamLayout
from gradstats.scaling._per_sample import PerSampleState
from gradstats.scaling._rules import make_rule
from gradstats.scaling._same_point import SamePointState
from gradstats.scaling._state import StatisticState, Totals
from gradstats.scaling._temporal import TemporalState

__all__ = ["Observation", "ScalerEngine"]


@dataclass(frozen=True)
class Observation:
    """The validated gradients of one step, per device block, and their finiteness."""

    grads: tuple[list[torch.Tensor | None], ...]
    sq_norms: tuple[torch.Tensor, ...]
    masks: tuple[torch.Tensor, ...]
    finite: torch.Tensor  # 0-dim bool on the home device


def _make_state(
    tensors: list[torch.Tensor], config: ScalerConfig, distributed: bool, group: object
) -> StatisticState:
    if config.statistic == "temporal":
        return TemporalState(tensors, config.beta, config.foreach)
    if config.statistic == "same_point":
        return SamePointState(tensors, config.beta, distributed, group)
    if config.statistic == "per_sample":
        return PerSampleState(tensors, config.beta, distributed, group)
    return DiagnosticState(tensors, config.beta, config.statistic)


class ScalerEngine:
    """Statistics, counters and factor of one scaler over one :class:`ParamLayout`."""

    def __init__(
        self, layout: ParamLayout, config: ScalerConfig, distributed: bool, group: object
    ) -> None:
        self.layout = layout
        self.states: list[StatisticState] = [
            _make_state(list(layout.tensors[start:stop]), config, distributed, group)
            for start, stop in layout.blocks
        ]
        self.shapes = tuple(tuple(t.shape) for t in layout.tensors)
        home = layout.devices[0]
        self.home = home
        count = len(layout.names)
        if config.aggregate == "global":
            index, groups = [0] * count, 1
        elif config.aggregate == "tensor":
            index, groups = list(range(count)), count
        else:
            index, groups = list(layout.group_of), layout.groups
        self.group_index = torch.tensor(index, dtype=torch.int64, device=home)
        self.global_index = torch.zeros(count, dtype=torch.int64, device=home)
        self.groups = groups
        zero = torch.zeros((), dtype=torch.int64, device=home)
        self.nonfinite, self.consecutive, self.skipped = zero, zero.clone(), zero.clone()
        self.progress = torch.zeros((), dtype=torch.float64, device=home)
        self.last_applied = torch.zeros((), dtype=torch.bool, device=home)
        self.previous = torch.ones(groups, dtype=torch.float64, device=home)
        # the model-wide factor under the same rate limit (the progress clock and global reads
        # of a non-global aggregate; the same tensor as ``previous`` for aggregate="global")
        self.overall_previous = torch.ones(1, dtype=torch.float64, device=home)
        self.present = torch.zeros(count, dtype=torch.bool, device=home)
        self.result: tuple[Aggregates, Factors] | None = None
        self.overall: tuple[Aggregates, Factors] | None = None
        self.factor_per_tensor = torch.ones(count, dtype=torch.float64, device=home)
        self._masks: dict[tuple[int, tuple[bool, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
        self.updates = 0  # statistics updates so far (host int)

    # ------------------------------------------------------------------ update
    def _mask(
        self, block: int, present: tuple[bool, ...], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (block, present)
        if key not in self._masks:
            rows = [j for j, p in enumerate(present) if p]
            self._masks[key] = (
                torch.tensor(rows, dtype=torch.int64, device=device),
                torch.tensor(present, dtype=torch.bool, device=device),
            )
        return self._masks[key]

    def check_parameters(self) -> None:
        """Raise a StateError if a parameter's shape or device changed since the state was
        built (the state would no longer fit it; ``rebind`` rebuilds it). Metadata only."""
        layout = self.layout
        for b, (start, stop) in enumerate(layout.blocks):
            for j in range(start, stop):
                tensor, name = layout.tensors[j], layout.names[j]
                if tuple(tensor.shape) != self.shapes[j]:
                    raise StateError(
                        f"parameter {name!r} now has shape {tuple(tensor.shape)} but the scaler's "
                        f"statistics are for shape {self.shapes[j]}; call rebind(params) after "
                        "changing parameters"
                    )
                if tensor.device != layout.devices[b]:
                    raise StateError(
                        f"parameter {name!r} moved to {tensor.device} but the scaler's statistics "
                        f"live on {layout.devices[b]}; call rebind(params) after moving the model"
                    )

    def observe(self) -> Observation:
        """Validate the current ``.grad`` of every tensor and measure it (changes no state)."""
        self.check_parameters()
        layout = self.layout
        grads_out, sq_out, mask_out = [], [], []
        finite = torch.ones((), dtype=torch.bool, device=self.home)
        for b, (start, stop) in enumerate(layout.blocks):
            grads = [t.grad for t in layout.tensors[start:stop]]
            for g in grads:
                if g is not None and g.is_sparse:
                    raise ConfigurationError(
                        "sparse gradients are not supported by VarianceGradientScaler"
                    )
            present = tuple(g is not None for g in grads)
            rows, mask = self._mask(b, present, layout.devices[b])
            sq = torch.zeros(stop - start, dtype=torch.float64, device=layout.devices[b])
            if any(present):
                sq = sq.index_copy(0, rows, squared_norms([g for g in grads if g is not None]))
            finite = finite & torch.isfinite(sq.sum()).to(self.home)
            grads_out.append(grads)
            sq_out.append(sq)
            mask_out.append(mask)
        return Observation(tuple(grads_out), tuple(sq_out), tuple(mask_out), finite)

    def apply(
        self,
        observation: Observation,
        *,
        skip: torch.Tensor | bool | None,
        grad_inv: torch.Tensor | None,
        hook_inv: torch.Tensor | None,
    ) -> None:
        """Feed one observation to the statistics and advance the counters (no host sync)."""
        finite = observation.finite
        apply = finite
        if isinstance(skip, bool):  # a fill on the device, not a host-to-device copy
            apply = apply & torch.full((), not skip, dtype=torch.bool, device=self.home)
        elif skip is not None:
            apply = apply & ~skip.to(device=self.home, dtype=torch.bool)
        for grads, sq, mask, state, device in zip(
            observation.grads,
            observation.sq_norms,
            observation.masks,
            self.states,
            self.layout.devices,
            strict=True,
        ):
            take = mask & apply.to(device)
            if grad_inv is not None:
                sq = sq * grad_inv.to(device).square()
            state.update(grads, sq, take, grad_inv=grad_inv, hook_inv=hook_inv)
        self.present = torch.cat([mask.to(self.home) for mask in observation.masks])
        self.nonfinite = self.nonfinite + (~finite).to(torch.int64)
        self.consecutive = torch.where(finite, 0, self.consecutive + 1)
        self.skipped = self.skipped + (~apply).to(torch.int64)
        self.last_applied = apply
        self.updates += 1

    def discard_pending(self) -> None:
        """Drop what same-point hooks recorded for a step that will not be applied."""
        for state in self.states:
            if isinstance(state, SamePointState):
                state.discard_pending()

    # ----------------------------------------------------------------- factor
    def totals(self) -> Totals:
        return Totals.concatenated([state.totals() for state in self.states], self.home)

    def refresh_factor(self, config: ScalerConfig) -> None:
        """Recompute ρ and the factor of every aggregate from the current statistics."""
        totals = self.totals()
        min_count = self.states[0].min_count
        include = self.present & (totals.count >= min_count)
        settings = FactorSettings(
            rule=make_rule(config), beta=config.beta, eps=config.eps,
            confidence=config.confidence, min_count=min_count,
            warm=self.updates > config.warmup_steps,
        )  # fmt: skip
        args = (totals.noise, totals.signal, totals.count, include)
        summed = aggregate(*args, self.group_index, self.groups)
        result = scaling_factor(summed, self.previous, settings, max_rate=config.max_rate)
        self.previous = result.factor
        self.result = (summed, result)
        self.factor_per_tensor = result.factor[self.group_index]
        if config.aggregate == "global":
            self.overall = self.result
        else:
            overall = aggregate(*args, self.global_index, 1)
            factors = scaling_factor(
                overall, self.overall_previous, settings, max_rate=config.max_rate
            )
            self.overall = (overall, factors)
        self.overall_previous = self.overall[1].factor

    def advance_progress(self) -> None:
        """τ += the model-wide factor of the update just applied (a skipped update adds 0): the
        progress clock, in steps of the base batch (``rule="adascale"``)."""
        if self.overall is not None:
            factor = self.overall[1].factor[0]
            self.progress = self.progress + torch.where(self.last_applied, factor, 0.0)
