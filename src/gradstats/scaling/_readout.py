"""The scaler's host reads and persistence: factor, ρ, statistics, checkpoints, rebinding.

:class:`ScalerReadout` is the half of :class:`~gradstats.scaling.VarianceGradientScaler` that
reads its :class:`~gradstats.scaling.ScalerState` (every method here is an explicit host read or
runs off the per-step path) and saves or restores it; all of it goes through the functions of the
state (``_report``, ``_checkpoint``, ``_engine.refresh``).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from gradstats.errors import ConfigurationError
from gradstats.scaling._checkpoint import LoadReport, load, save
from gradstats.scaling._config import ScalerConfig
from gradstats.scaling._engine import refresh
from gradstats.scaling._hooks import GradientTracker
from gradstats.scaling._nonfinite import ConsecutiveLimit
from gradstats.scaling._params import ParamLayout, layout_from
from gradstats.scaling._report import TensorStatistics, build_statistics
from gradstats.scaling._rules import constant_factor
from gradstats.scaling._scaler_state import ScalerState

__all__ = ["ScalerReadout"]


class ScalerReadout:
    """Reads and checkpoints of a scaler (see :class:`~gradstats.VarianceGradientScaler`)."""

    config: ScalerConfig
    optimizer: torch.optim.Optimizer | None
    _model: torch.nn.Module | None
    _state: ScalerState
    _limit: ConsecutiveLimit
    _tracker: GradientTracker
    _read_token: tuple[object, ...] | None
    _scaled_token: tuple[object, ...] | None
    _idle_steps: int
    #: the readouts (ρ, gates, per-aggregate rows) lag the statistics: the last update skipped
    #: them because the factor is 1 whatever they are (``_rules.constant_factor``)
    _stale: bool = False

    def _build(self, layout: ParamLayout) -> None:
        raise NotImplementedError

    def _lazy_readouts(self) -> bool:
        """Whether this update may skip the readouts (and mark them stale)."""
        self._stale = constant_factor(self.config)
        return self._stale

    def _current(self) -> ScalerState:
        """The state with its readouts formed (no sync): what every read goes through."""
        if self._stale:
            self._state, self._stale = refresh(self._state, self.config), False
        return self._state

    @property
    def state(self) -> ScalerState:
        """The current :class:`~gradstats.scaling.ScalerState` (statistics, counters, factor,
        clock). Read it, do not change it: the scaler updates it in place; pass a copy
        (``gradstats.scaling.update`` leaves its argument unchanged) to experiment."""
        return self._current()

    @property
    def layout(self) -> ParamLayout:
        """Names, tensors, param groups and device blocks of the tracked parameters."""
        return self._state.layout

    @property
    def updates(self) -> int:
        """Statistics updates so far (skipped steps included)."""
        return self._state.updates

    @property
    def skipped(self) -> torch.Tensor:
        """Steps dropped so far (non-finite, or skipped by the caller): an int64 device scalar
        (no sync; ``int(vgs.skipped)`` reads it)."""
        return self._state.skipped

    @property
    def progress(self) -> torch.Tensor:
        """The progress clock τ = Σ_t f_t over the applied updates (a float64 device scalar; no
        sync). With ``rule="adascale"`` it counts base-batch steps: drive a schedule written for
        the base batch by τ, e.g. ``LambdaLR(opt, lambda _: schedule(float(vgs.progress)))``
        (one host read per step)."""
        return self._state.progress

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.config = dataclasses.replace(self.config, enabled=value)

    @property
    def warmup_steps(self) -> int:
        return self.config.warmup_steps

    @warmup_steps.setter
    def warmup_steps(self, value: int) -> None:
        self.config = dataclasses.replace(self.config, warmup_steps=value)

    # ------------------------------------------------------------------- reads
    def get_scaling_factor(self) -> float:
        """The model-wide factor c (1.0 before any estimate). Host read (a sync)."""
        overall = self._current().overall
        if not self.enabled or overall is None:
            return 1.0
        return float(overall[1].factor[0])  # sync-ok: explicit host read

    def get_normalized_variance(self) -> float:
        """The model-wide ρ = noise/signal (nan: no estimate, inf: no signal). Host read."""
        overall = self._current().overall
        if overall is None:
            return float("nan")
        factors = overall[1]
        pair = torch.stack([factors.rho[0], factors.no_estimate[0].double()])
        rho, no_estimate = pair.tolist()  # sync-ok: explicit host read
        return float("nan") if no_estimate else float(rho)

    def scaling_factors(self) -> torch.Tensor:
        """The applied factor of every aggregate (device tensor; no sync)."""
        return self._state.factor

    def statistics(self) -> dict[str, TensorStatistics]:
        """Per-tensor and aggregate statistics as host numbers (one host read).

        Keys: every parameter name, ``"global"``, and ``"group<k>"`` per param group when
        ``aggregate="param_group"``. See :class:`~gradstats.scaling.TensorStatistics`; ρ is
        ``normalized_variance`` (logger key ``vgs/rho``).

        ``effective_sample_size`` is n_eff = 1/Σ_k w_k² of the EMA weights: how many equally
        weighted steps the estimate is worth (t for the first few steps, then up to
        (1 + β)/(1 − β), 199 at β = 0.99). The factor is applied once the relative standard
        error sqrt(2/(n_eff − 1)) of ρ is at most ``confidence`` (n_eff >= 9 at the default
        0.5). With ``statistic="same_point"`` only steps with two or more micro-batches (or
        DDP ranks) count: a loop with one backward per step stays at n_eff = 0,
        ``no_estimate=True``, and warns after 20 updates.
        """
        return build_statistics(self._current(), self.config)

    def refresh(self) -> None:
        """Recompute ρ and the factor from the statistics as they are now (no sync), e.g. to
        read ``statistics()["global"]`` right after a load. ``step`` does this after every
        update; with ``max_rate`` each call is one rate-limited move of the factor."""
        self._state, self._stale = refresh(self._state, self.config), False

    # ------------------------------------------------------------- state
    def reset_statistics(self) -> None:
        """Forget all statistics (keeps configuration and parameters)."""
        self._build(self.layout)

    def state_dict(self) -> dict[str, object]:
        """Checkpoint keyed by parameter name (shape, dtype, statistic state), plus ``version``
        and ``config``; loadable with ``torch.load(weights_only=True)``."""
        return save(self._current(), self.config)

    def load_state_dict(
        self,
        state_dict: dict[str, Any],
        *,
        strict: bool = True,
        use_checkpoint_config: bool = False,
    ) -> LoadReport:
        """Restore a checkpoint. The constructor's configuration wins unless
        ``use_checkpoint_config=True``.

        The whole dict is checked first (every key present, every value possible: no negative
        count or variance, no NaN, the right shapes): a :class:`~gradstats.errors.StateError`
        naming the key is raised and nothing is loaded. With ``strict=True`` names or shapes
        that do not match are a ``StateError`` listing them; ``strict=False`` skips them (with
        a warning)."""
        return self._load(state_dict, strict, use_checkpoint_config, quiet=False)

    def _load(
        self, state_dict: object, strict: bool, use_checkpoint_config: bool, quiet: bool
    ) -> LoadReport:
        self._state, plan = load(
            self._current(), self.config, state_dict, strict, use_checkpoint_config, quiet
        )
        self.config = plan.config
        self._stale = False  # (as an eager scaler: the readouts of the next update or refresh)
        self._limit.reset(plan.updates, plan.consecutive, plan.nonfinite)
        return plan.report

    def rebind(
        self,
        params: object,
        optimizer: torch.optim.Optimizer | None = None,
        model: torch.nn.Module | None = None,
    ) -> LoadReport:
        """Point the scaler at new parameter tensors (model/optimizer recreated), keeping the
        statistics of every name whose shape still matches. Returns what was kept/dropped.
        ``model``: the re-created model (``statistic="per_sample"``; default: the old one)."""
        if model is not None and self._model is None:
            raise ConfigurationError(
                f"rebind(model=...) is for statistic='per_sample'; this scaler tracks "
                f"{self.config.statistic!r}"
            )
        layout = layout_from(params, optimizer)
        state = self.state_dict()
        saved = (self._state, self._model, self.optimizer, copy.copy(self._limit))
        tokens = (self._read_token, self._scaled_token, self._idle_steps)
        if optimizer is not None:
            self.optimizer = optimizer
        if model is not None:
            self._model = model
        try:
            self._build(layout)
        except BaseException:  # nothing half-updated: the old statistics and hooks come back
            self._state, self._model, self.optimizer, self._limit = saved
            self._read_token, self._scaled_token, self._idle_steps = tokens
            self._tracker.register(
                self._state.layout, list(self._state.statistics), self._model, self.config.unit
            )
            raise
        return self._load(state, strict=False, use_checkpoint_config=False, quiet=True)

    def update_parameters(self, params: object) -> LoadReport:
        """The original's name for :meth:`rebind`."""
        return self.rebind(params)
