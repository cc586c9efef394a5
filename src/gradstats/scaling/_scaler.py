r"""``VarianceGradientScaler``: the step factor 1/(1 + α·noise/signal) from measured noise."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from gradstats._warnings import warn
from gradstats.errors import ConfigurationError, ConfigurationTypeError, NonFiniteError
from gradstats.moments._distributed import distributed_ready
from gradstats.scaling._amp import loss_scale_of
from gradstats.scaling._apply import (
    located_gradients,
    multiply_gradients,
    scaled_learning_rates,
    warn_if_adaptive,
)
from gradstats.scaling._config import ScalerConfig, one_config
from gradstats.scaling._engine import acceptable, discard_pending, observe, update_
from gradstats.scaling._hooks import GradientTracker
from gradstats.scaling._nonfinite import ConsecutiveLimit, check_skip
from gradstats.scaling._params import ParamLayout, layout_from
from gradstats.scaling._readout import ScalerReadout
from gradstats.scaling._report import log_metrics
from gradstats.scaling._scaler_state import init
from gradstats.scaling._statistic import get_statistic, registered_statistics

__all__ = ["IDLE_STEPS", "VarianceGradientScaler"]

IDLE_STEPS = 20  # consecutive step() calls without new gradients before the rebind() warning

_D = ScalerConfig()


class VarianceGradientScaler(ScalerReadout):
    r"""Measures the gradient noise of each step and turns it into a step factor (``rule``).

    With ρ = tr Cov(ĝ) / ‖E ĝ‖² the inverse SNR of the applied (mini-batch) gradient ĝ of B
    samples (B_noise = ρ·B), the factor is ``rule="adascale"`` (default): AdaScale's gain
    r = (1 + Sρ)/(1 + ρ) for a batch S× the one the lr was tuned for, with the progress clock
    :attr:`progress`; S = 1 unless ``scale`` or ``base_batch_size`` is given, and then r = 1:
    the step is the baseline's, while ρ, B_noise and its SE are measured and reported. Or
    ``rule="shrink"``: c = 1 / (1 + α ρ) (the original's; optimal only if the base lr is the
    large-batch optimum; :mod:`gradstats.scaling._rules`). How ρ is measured (``statistic``;
    the default ``"auto"`` is ``"per_sample"`` with ``model=``, else ``"same_point"``):

    * ``"temporal"`` (the original's; the default before): per-coordinate noise over an EMA
      window of the step's gradients, V = Σ_i v_i/(1 − ρ_w), S = Σ_i m_i² − ρ_w V, ρ = V/S
      (``_temporal``); one gradient per step, but it counts parameter drift as noise.
    * ``"same_point"``: noise at a fixed θ from the micro-batches (gradient accumulation) or DDP
      ranks of one step — the two-batch estimator (``gradstats.scaling._same_point``). Needs
      several backward calls per step: with one (a plain loop) there is never an estimate
      (factor 1, ρ NaN, ``no_estimate``) and the scaler warns once after 20 such updates.
    * ``"per_sample"``: the same estimator with B_small = 1 from the per-example gradients of
      one backward (``unit="sample"`` or ``"token"``), formed by hooks on ``model``'s modules
      (``gradstats.scaling._per_sample``): tr Σ = (Σ‖g_i‖² − B‖ĝ‖²)/(B − 1) and
      ‖G‖² = ‖ĝ‖² − tr Σ/B, both unbiased, at about the cost of a plain backward.
    * ``"tensor_mean"``, ``"mixed"``, ``"spatial"``: the original implementation's statistics,
      kept as labelled diagnostics; none of them measures noise (``_diagnostics``).

    Per-tensor counts t_j (a tensor without a gradient on a step, or a skipped step, does not
    advance its count), ratio-of-sums aggregation over the tensors that have gradients
    (``aggregate`` = ``"global"``, ``"param_group"`` or ``"tensor"``), "no estimate" and "no
    detectable signal" states instead of divisions by eps, optional bounds ``[min_scale, 1]``, a
    rate limit ``max_rate`` on |Δ log c|, a fixed ``warmup_steps`` and a ``confidence`` gate on
    the relative standard error of ρ (``_factor``).

    Order of a training step: statistics from the raw gradients (after DDP reduce and AMP
    unscale, before clipping) → clipping → the factor → ``optimizer.step()``::

        loss.backward()
        vgs.step()                                   # reads raw .grad, computes the factor
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with vgs.apply(optimizer):                   # scales .grad (apply_to="grad") or the
            optimizer.step()                         # lrs for this step (apply_to="lr")

    The original's order (``scale_gradients()``, clip, ``optimizer.step()``, ``step()``) works
    too: statistics are read from each new set of gradients exactly once, before any scaling —
    never back from scaled or clipped gradients. New gradients are recognised by a
    post-accumulate hook on every parameter (and by ``.grad`` being replaced);
    ``update_statistics()`` reads the current gradients unconditionally.

    A stateful shell over :class:`~gradstats.scaling.ScalerState` (``vgs.state``) and ``update``.
    No host sync happens in ``step``/``update_statistics``/``scale_gradients``: all state lives
    on the parameters' devices and non-finite gradients are detected and skipped on the device.
    Host reads are explicit: ``get_scaling_factor()``, ``get_normalized_variance()``,
    ``statistics()``, the logger (every ``log_every`` updates), the ``max_nonfinite_steps`` check
    (about one read every ``max_nonfinite_steps`` updates, exact: see ``_nonfinite``),
    ``nonfinite="raise"`` (one read per update), and ``apply_to="lr"`` with a float learning
    rate (one read of the factor per step; pass ``lr`` as a tensor to avoid it).

    Non-finite gradients (the library's one policy, :mod:`gradstats.errors`): with
    ``nonfinite="skip"`` (default) a step whose gradients hold NaN/±inf is dropped as a whole on
    the device and counted in ``skipped`` (:attr:`skipped`, ``statistics()["global"].skipped``,
    ``vgs/skipped``, ``state_dict()["counters"]["skipped"]``); ``max_nonfinite_steps`` = N
    consecutive ones raise :class:`~gradstats.errors.NonFiniteError` (a ``FloatingPointError``)
    at exactly the N-th. With ``nonfinite="raise"`` the first non-finite step raises
    ``NonFiniteError`` before anything changes (not for AMP: its overflow steps are expected and
    are what ``"skip"`` is for).

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``) or param-group
            dicts. Checkpoints are keyed by these names.
        statistic, unit, rule, alpha, beta, eps, warmup_steps, min_scale, max_rate, apply_to,
            aggregate, confidence, enabled, foreach, batch_size, base_batch_size, scale, log_every,
            max_nonfinite_steps, nonfinite: see :class:`~gradstats.scaling.ScalerConfig`
            (or pass ``config=ScalerConfig(...)`` instead of keywords); ``eps`` is the signal
            level at or below which there is "no detectable signal" (never a divisor),
            ``confidence`` the largest relative standard error of ρ at which the factor is
            applied (``None``: no gate),
            ``batch_size`` the samples per step (B_noise = ρ·B; with ``base_batch_size``, the
            batch the lr was tuned for, it sets adascale's S), ``foreach=False``
            selects the readable per-coordinate reference implementation.
        model: the module whose parameters are tracked (``"per_sample"``, or ``"auto"``).
        logger: ``callable(metrics: dict[str, float], step: int)`` receiving ``vgs/...`` keys.
        optimizer: the optimizer (param-group membership; adaptive-optimizer warning; ``apply``).
        distributed: same-point estimation across DDP ranks (default: when a process group with
            more than one rank is initialised). process_group: the group to reduce over.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> vgs = VarianceGradientScaler(model.named_parameters(), model=model, batch_size=8)
        >>> for _ in range(3):  # defaults: "auto" -> "per_sample" (model=), adascale at S = 1
        ...     model.zero_grad()
        ...     model(torch.randn(8, 3)).pow(2).mean().backward()
        ...     vgs.step()
        >>> vgs.config.statistic, vgs.get_scaling_factor()  # the baseline's step, B_noise measured
        ('per_sample', 1.0)
    """

    def __init__(
        self,
        params: object,
        *,
        statistic: str = _D.statistic,
        unit: str = _D.unit,
        rule: str = _D.rule,
        alpha: float = _D.alpha,
        beta: float = _D.beta,
        eps: float = _D.eps,
        warmup_steps: int = _D.warmup_steps,
        min_scale: float = _D.min_scale,
        max_rate: float | None = _D.max_rate,
        apply_to: str = _D.apply_to,
        aggregate: str = _D.aggregate,
        confidence: float | None = _D.confidence,
        enabled: bool = _D.enabled,
        foreach: bool = _D.foreach,
        batch_size: int | None = _D.batch_size,
        base_batch_size: int | None = _D.base_batch_size,
        scale: float | None = _D.scale,
        log_every: int = _D.log_every,
        max_nonfinite_steps: int | None = _D.max_nonfinite_steps,
        nonfinite: str = _D.nonfinite,
        logger: Callable[[dict[str, float], int], object] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        distributed: bool | None = None,
        process_group: object | None = None,
        config: ScalerConfig | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        options = ScalerConfig(
            statistic=statistic, unit=unit, rule=rule, alpha=alpha, beta=beta, eps=eps,
            warmup_steps=warmup_steps, min_scale=min_scale, max_rate=max_rate,
            apply_to=apply_to, aggregate=aggregate, confidence=confidence, enabled=enabled,
            foreach=foreach, batch_size=batch_size, base_batch_size=base_batch_size, scale=scale,
            log_every=log_every, max_nonfinite_steps=max_nonfinite_steps, nonfinite=nonfinite,
        )  # fmt: skip
        self.config = one_config(config, options).resolved(model)  # "auto" -> the statistic
        spec = get_statistic(self.config.statistic)
        if logger is not None and not callable(logger):
            raise ConfigurationTypeError(
                f"logger must be callable(metrics, step); got {type(logger).__name__}"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigurationTypeError(
                f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}"
            )
        if (model is None) == spec.needs_model:
            users = " or ".join(
                f"statistic={n!r}" for n in registered_statistics() if get_statistic(n).needs_model
            )
            raise ConfigurationError(
                f"statistic={spec.name!r} needs model=<the nn.Module whose parameters are tracked>"
                if model is None
                else f"model= is used by {users} or 'auto' only; got {spec.name!r}"
            )
        self.logger, self.optimizer, self.process_group = logger, optimizer, process_group
        self._model = model
        if distributed is None:
            distributed = distributed_ready() and torch.distributed.get_world_size() > 1
        self.distributed = bool(distributed)
        layout = layout_from(params, optimizer)
        if spec.diagnostic:
            warn(
                f"statistic={spec.name!r} is a legacy diagnostic of the original scaler; it "
                "does not measure gradient noise (use 'auto', 'per_sample' or 'same_point')"
            )
        self._tracker = GradientTracker()
        self._limit = ConsecutiveLimit()
        self._build(layout)
        if optimizer is not None:
            warn_if_adaptive(self.config.apply_to, optimizer)

    # --------------------------------------------------------------- structure
    def _build(self, layout: ParamLayout) -> None:
        self._state = init(
            self.config, layout, distributed=self.distributed, process_group=self.process_group
        )
        self._read_token: tuple[object, ...] | None = None
        self._scaled_token: tuple[object, ...] | None = None
        self._limit.reset(updates=0, consecutive=0, seen=0)
        self._idle_steps = 0
        unit = self.config.unit
        self._tracker.register(layout, list(self._state.statistics), self._model, unit)

    def observe(self, grads: object) -> None:
        """Record one micro-batch's gradients explicitly (``statistic="same_point"``).

        For gradients that do not flow through ``backward()`` into ``.grad`` (e.g. from
        ``torch.func``): pass them as a dict by parameter name or a list in ``params`` order;
        ``.grad`` must hold their mean when :meth:`step` runs. Backward passes are recorded
        automatically by hooks and need no call.
        """
        if not get_statistic(self.config.statistic).micro_batches:
            takers = [n for n in registered_statistics() if get_statistic(n).micro_batches]
            raise RuntimeError(
                f"observe() records micro-batches for statistic={' or '.join(map(repr, takers))}"
                f"; this scaler tracks {self.config.statistic!r}"
            )
        for block, local, grad in located_gradients(self.layout, grads):
            self._state.statistics[block].observe(local, grad)  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Backward passes inside this block are not recorded (same-point micro-batches,
        per-sample norms)."""
        with self._tracker.paused():
            yield

    def remove_hooks(self) -> None:
        """Detach every hook this scaler put on the parameters and modules (it stops
        tracking them)."""
        self._tracker.remove()

    def _token(self) -> tuple[object, ...]:
        return self._tracker.token(self.layout)

    # ----------------------------------------------------------------- update
    def update_statistics(
        self,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        scaled: bool = False,
        skip: torch.Tensor | bool | None = None,
        loss_scale: torch.Tensor | float | None = None,
    ) -> None:
        """Read the current gradients and update the statistics and the factor (no host sync).

        Everything is checked before anything changes: a sparse gradient
        (ConfigurationError), a parameter whose shape or device changed since the statistics
        were built (StateError: ``rebind``), or — with ``nonfinite="raise"`` — a non-finite
        gradient (NonFiniteError; one host read) leave the scaler exactly as it was.

        Args:
            grad_scaler: the AMP ``GradScaler`` of this step. Same-point hooks saw gradients
                multiplied by its scale S and are divided by it (S is read on the device as
                ``grad_scaler.scale(1)``: no sync, no private attribute; ``_amp``).
            scaled: ``.grad`` still carries the loss scale S (``unscale_`` has not run yet);
                every observation is then divided by S on the device. Needs ``grad_scaler``.
            skip: a bool or a 0-dim tensor (non-zero: skip; AMP's ``found_inf`` works) that
                turns this update into a counted no-op; a skipped update never raises under
                ``nonfinite="raise"``.
            loss_scale: S itself (a device tensor, or a number) instead of ``grad_scaler``, for
                other loss scalers.
        """
        if not self.enabled:
            return
        if scaled and grad_scaler is None and loss_scale is None:
            raise ConfigurationError(
                "scaled=True needs the grad_scaler (or loss_scale) whose scale the gradients carry"
            )
        check_skip(skip)
        config, state = self.config, self._state
        loss_scale = loss_scale_of(grad_scaler, loss_scale, state.home)
        scaled = scaled and loss_scale is not None  # a disabled GradScaler scales nothing
        observation = observe(state, skip=skip, loss_scale=loss_scale, scaled=scaled)
        if config.nonfinite == "raise" and skip is not True and not acceptable(observation):
            discard_pending(state, config)
            raise NonFiniteError(
                f"the gradients of update {state.updates + 1} hold NaN or inf "
                "(nonfinite='raise'; the scaler is unchanged)"
            )
        self._state = state = update_(state, observation, config, readout=not self._lazy_readouts())
        self._read_token = self._token()
        if self.logger is not None and state.updates % config.log_every == 0:
            self.logger(log_metrics(self._current(), config), state.updates)
        if config.nonfinite == "skip":
            self._limit.check(
                state.updates, config.max_nonfinite_steps, state.consecutive, state.nonfinite
            )

    def step(
        self,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        scaled: bool = False,
        skip: torch.Tensor | bool | None = None,
        loss_scale: torch.Tensor | float | None = None,
    ) -> None:
        """Update the statistics if new gradients arrived since they were last read.

        Call it right after ``backward()`` (and AMP ``unscale_``). Called after
        ``optimizer.step()`` in the original's order, it finds no new gradients and reads
        nothing. A no-op when ``enabled`` is False. After ``IDLE_STEPS`` (20) consecutive calls
        without new gradients it warns (once per such streak; a re-created model needs
        :meth:`rebind`).
        """
        if not self.enabled:
            return
        if self._token() != self._read_token:
            self._idle_steps = 0
            self.update_statistics(
                grad_scaler=grad_scaler, scaled=scaled, skip=skip, loss_scale=loss_scale
            )
            return
        self._idle_steps += 1
        if self._idle_steps == IDLE_STEPS:
            warn(
                f"{IDLE_STEPS} consecutive step() calls found no new gradient on the "
                f"{len(self.layout.names)} tracked parameters: if the model or optimizer was "
                "re-created, call vgs.rebind(model.named_parameters()) (the scaler is not "
                "updating)"
            )

    # --------------------------------------------------------------- applying
    def scale_gradients(self) -> None:
        """Multiply every gradient by its factor, once per set of gradients (no host sync).

        Reads the statistics first if these gradients were not read yet (the original's order).
        """
        if not self.enabled:
            return
        if self.config.apply_to != "grad":
            raise RuntimeError(
                "scale_gradients() needs apply_to='grad'; this scaler has apply_to='lr' "
                "(use apply(optimizer))"
            )
        self.step()
        if self._token() == self._scaled_token:
            return
        shared = self.config.aggregate == "global"
        multiply_gradients(self.layout, self._state.factor_per_tensor, shared)
        self._scaled_token = self._token()

    @contextlib.contextmanager
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
        """Context for ``optimizer.step()``: applies the factor for this one step.

        ``apply_to="grad"`` scales the gradients on entry; ``apply_to="lr"`` multiplies each
        param group's ``lr`` on entry and restores the original values on exit (a float ``lr``
        costs one host read of the factor; a tensor ``lr`` is scaled on the device). Gradients
        not read yet are read first.
        """
        if not self.enabled:
            yield
            return
        if self.config.apply_to == "grad":
            if optimizer is not None:
                warn_if_adaptive(self.config.apply_to, optimizer)
            self.scale_gradients()
            yield
            return
        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is None:
            raise ConfigurationError(
                "apply_to='lr' needs the optimizer: pass it to apply() or the constructor"
            )
        groups = len(optimizer.param_groups)
        if self.config.aggregate != "global" and groups != self._state.groups:
            raise ConfigurationError(  # checked before the statistics read these gradients
                f"optimizer has {groups} param groups but the scaler aggregates over "
                f"{self._state.groups}"
            )
        self.step()
        factors = self._state.factor
        if self.config.aggregate == "global":
            factors = factors.expand(groups)
        with scaled_learning_rates(optimizer, factors):
            yield

    def __repr__(self) -> str:
        c = self.config
        return (
            f"VarianceGradientScaler(statistic={c.statistic!r}, alpha={c.alpha}, beta={c.beta}, "
            f"apply_to={c.apply_to!r}, aggregate={c.aggregate!r}, tensors={len(self.layout.names)})"
        )
