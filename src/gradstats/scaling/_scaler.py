r"""``VarianceGradientScaler``: the step factor 1/(1 + α·noise/signal) from measured noise."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
import weakref
from collections.abc import Callable, Iterator

import torch

from gradstats.moments._distributed import distributed_ready
from gradstats.scaling._apply import (
    located_gradients,
    multiply_gradients,
    scaled_learning_rates,
    warn_if_adaptive,
)
from gradstats.scaling._checkpoint import LoadReport, load_scaler_state, scaler_state
from gradstats.scaling._config import ScalerConfig
from gradstats.scaling._diagnostics import DIAGNOSTICS, DiagnosticState
from gradstats.scaling._factor import aggregate, scaling_factor
from gradstats.scaling._kernels import squared_norms
from gradstats.scaling._params import ParamLayout, layout_from
from gradstats.scaling._report import TensorStatistics, build_statistics, log_metrics
from gradstats.scaling._same_point import SamePointState
from gradstats.scaling._temporal import TemporalState

__all__ = ["VarianceGradientScaler"]

_D = ScalerConfig()


class VarianceGradientScaler:
    r"""Shrinks each step by the measured inverse signal-to-noise ratio of its gradient.

    With ρ = tr Cov(ĝ) / ‖E ĝ‖² the inverse SNR of the applied (mini-batch) gradient ĝ, the factor
    is c = 1 / (1 + α ρ). α = 1 is the MSE-optimal shrinkage of a noisy gradient, McCandlish et
    al.'s ε_opt(B)/ε_max and SVAG's factor. How ρ is measured (``statistic``):

    * ``"temporal"`` (default): per-coordinate noise over an EMA window of the gradients this
      step sequence produced, V = Σ_i v_i/(1 − ρ_w) and S = Σ_i m_i² − ρ_w V, ρ = V/S
      (``gradstats.scaling._temporal``). Needs one gradient per step.
    * ``"same_point"``: noise at a fixed θ from the micro-batches (gradient accumulation) or DDP
      ranks of one step — the two-batch estimator (``gradstats.scaling._same_point``).
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

    No host sync happens in ``step``/``update_statistics``/``scale_gradients``: all state lives
    on the parameters' devices and non-finite gradients are detected and skipped on the device.
    Host reads are explicit: ``get_scaling_factor()``, ``get_normalized_variance()``,
    ``statistics()``, the logger (every ``log_every`` updates), the non-finite check (every
    ``max_nonfinite_steps`` updates; it raises ``FloatingPointError`` after that many
    consecutive non-finite steps), and ``apply_to="lr"`` with a float learning rate (one read
    of the factor per step; pass ``lr`` as a tensor to avoid it).

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``) or param-group
            dicts. Checkpoints are keyed by these names.
        statistic, alpha, beta, eps, warmup_steps, min_scale, max_rate, apply_to, aggregate,
            confidence, enabled, foreach, batch_size, log_every, max_nonfinite_steps: see
            :class:`~gradstats.scaling.ScalerConfig`; ``eps`` is the signal level at or below
            which there is "no detectable signal" (never a divisor), ``confidence`` the largest
            relative standard error of ρ at which the factor is applied (``None``: no gate),
            ``batch_size`` the samples per step (only to report B_noise = ρ·B), ``foreach=False``
            selects the readable per-coordinate reference implementation.
        logger: ``callable(metrics: dict[str, float], step: int)`` receiving ``vgs/...`` keys.
        optimizer: the optimizer (param-group membership; adaptive-optimizer warning; ``apply``).
        distributed: same-point estimation across DDP ranks (default: when a process group with
            more than one rank is initialised). process_group: the group to reduce over.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> vgs = VarianceGradientScaler(model.named_parameters(), beta=0.9)
        >>> for _ in range(3):
        ...     model.zero_grad()
        ...     model(torch.randn(8, 3)).pow(2).mean().backward()
        ...     vgs.step()
        >>> 0.0 <= vgs.get_scaling_factor() <= 1.0
        True
    """

    def __init__(
        self,
        params: object,
        *,
        statistic: str = _D.statistic,
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
        log_every: int = _D.log_every,
        max_nonfinite_steps: int | None = _D.max_nonfinite_steps,
        logger: Callable[[dict[str, float], int], object] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        distributed: bool | None = None,
        process_group: object | None = None,
    ) -> None:
        self.config = ScalerConfig(
            statistic=statistic, alpha=alpha, beta=beta, eps=eps, warmup_steps=warmup_steps,
            min_scale=min_scale, max_rate=max_rate, apply_to=apply_to, aggregate=aggregate,
            confidence=confidence, enabled=enabled, foreach=foreach, batch_size=batch_size,
            log_every=log_every, max_nonfinite_steps=max_nonfinite_steps,
        )  # fmt: skip
        if logger is not None and not callable(logger):
            raise TypeError(f"logger must be callable(metrics, step); got {type(logger).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer)}")
        self.logger, self.optimizer, self.process_group = logger, optimizer, process_group
        if distributed is None:
            distributed = distributed_ready() and torch.distributed.get_world_size() > 1
        self.distributed = bool(distributed)
        if statistic in DIAGNOSTICS:
            warnings.warn(
                f"statistic={statistic!r} is a legacy diagnostic of the original scaler; it does "
                "not measure gradient noise (use 'temporal' or 'same_point')",
                stacklevel=2,
            )
        self._hooks: list[object] = []
        self._build(layout_from(params, optimizer))
        if optimizer is not None:
            warn_if_adaptive(self.config.apply_to, optimizer)

    # --------------------------------------------------------------- structure
    def _build(self, layout: ParamLayout) -> None:
        config = self.config
        self.layout = layout
        self._states = []
        for start, stop in layout.blocks:
            tensors = list(layout.tensors[start:stop])
            if config.statistic == "temporal":
                state = TemporalState(tensors, config.beta, config.foreach)
            elif config.statistic == "same_point":
                state = SamePointState(tensors, config.beta, self.distributed, self.process_group)
            else:
                state = DiagnosticState(tensors, config.beta, config.statistic)
            self._states.append(state)
        home = layout.devices[0]
        self._home = home
        count = len(layout.names)
        if config.aggregate == "global":
            index, groups = [0] * count, 1
        elif config.aggregate == "tensor":
            index, groups = list(range(count)), count
        else:
            index, groups = list(layout.group_of), layout.groups
        self._group_index = torch.tensor(index, dtype=torch.int64, device=home)
        self._global_index = torch.zeros(count, dtype=torch.int64, device=home)
        self._groups = groups
        zero = torch.zeros((), dtype=torch.int64, device=home)
        self._nonfinite, self._consecutive, self._skipped = zero, zero.clone(), zero.clone()
        self._previous = torch.ones(groups, dtype=torch.float64, device=home)
        self._present = torch.zeros(count, dtype=torch.bool, device=home)
        self._result: dict[str, torch.Tensor] | None = None
        self._global: dict[str, torch.Tensor] | None = None
        self._factor_per_tensor = torch.ones(count, dtype=torch.float64, device=home)
        self._masks: dict[tuple[int, tuple[bool, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
        self.updates = 0  # statistics updates so far (host int)
        self._events = 0  # gradient accumulations seen by the hooks
        self._read_token: tuple | None = None
        self._scaled_token: tuple | None = None
        self._nonfinite_seen = 0
        self._capture = True
        self._register_hooks()

    def _register_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for tensor in self.layout.tensors:
            self._hooks.append(tensor.register_post_accumulate_grad_hook(self._on_accumulate))
        if self.config.statistic == "same_point":
            for (start, stop), state in zip(self.layout.blocks, self._states, strict=True):
                for local, tensor in enumerate(self.layout.tensors[start:stop]):
                    owner = weakref.ref(self)
                    stage = functools.partial(_stage_hook, owner, state, local)
                    commit = functools.partial(_commit_hook, owner, state, local)
                    self._hooks.append(tensor.register_hook(stage))
                    self._hooks.append(tensor.register_post_accumulate_grad_hook(commit))

    def _on_accumulate(self, _tensor: torch.Tensor) -> None:
        self._events += 1

    def observe(self, grads: object) -> None:
        """Record one micro-batch's gradients explicitly (``statistic="same_point"``).

        For gradients that do not flow through ``backward()`` into ``.grad`` (e.g. from
        ``torch.func``): pass them as a dict by parameter name or a list in ``params`` order;
        ``.grad`` must hold their mean when :meth:`step` runs. Backward passes are recorded
        automatically by hooks and need no call.
        """
        if self.config.statistic != "same_point":
            raise RuntimeError(
                "observe() records micro-batches for statistic='same_point'; this scaler "
                f"tracks {self.config.statistic!r}"
            )
        for block, local, grad in located_gradients(self.layout, grads):
            self._states[block].observe(local, grad)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Backward passes inside this block are not recorded as same-point micro-batches."""
        previous, self._capture = self._capture, False
        try:
            yield
        finally:
            self._capture = previous

    def remove_hooks(self) -> None:
        """Detach every hook this scaler put on the parameters (it stops tracking them)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _token(self) -> tuple:
        """Identifies the current gradients: hook events plus the identity of every ``.grad``."""
        return (
            self._events,
            tuple(id(t.grad) if t.grad is not None else 0 for t in self.layout.tensors),
        )

    # ----------------------------------------------------------------- update
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

    def _mask(self, block: int, present: tuple[bool, ...], device: torch.device):
        key = (block, present)
        if key not in self._masks:
            rows = [j for j, p in enumerate(present) if p]
            self._masks[key] = (
                torch.tensor(rows, dtype=torch.int64, device=device),
                torch.tensor(present, dtype=torch.bool, device=device),
            )
        return self._masks[key]

    def update_statistics(
        self,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        scaled: bool = False,
        skip: torch.Tensor | bool | None = None,
    ) -> None:
        """Read the current gradients and update the statistics and the factor (no host sync).

        Args:
            grad_scaler: the AMP ``GradScaler`` of this step. Same-point hooks saw gradients
                multiplied by its scale S and are divided by it.
            scaled: ``.grad`` still carries the loss scale S (``unscale_`` has not run yet);
                every observation is then divided by S on the device. Needs ``grad_scaler``.
            skip: a bool (or 0-dim bool tensor) that turns this update into a no-op.
        """
        if not self.enabled:
            return
        amp = grad_scaler is not None and grad_scaler.is_enabled()
        if scaled and grad_scaler is None:
            raise ValueError("scaled=True needs the grad_scaler whose scale the gradients carry")
        config = self.config
        blocks = []
        finite = torch.ones((), dtype=torch.bool, device=self._home)
        for b, (start, stop) in enumerate(self.layout.blocks):
            grads = [t.grad for t in self.layout.tensors[start:stop]]
            for g in grads:
                if g is not None and g.is_sparse:
                    raise ValueError("sparse gradients are not supported by VarianceGradientScaler")
            present = tuple(g is not None for g in grads)
            rows, mask = self._mask(b, present, self.layout.devices[b])
            sq = torch.zeros(stop - start, dtype=torch.float64, device=self.layout.devices[b])
            if any(present):
                sq = sq.index_copy(0, rows, squared_norms([g for g in grads if g is not None]))
            finite = finite & torch.isfinite(sq.sum()).to(self._home)
            blocks.append((grads, sq, mask))
        apply = finite
        if isinstance(skip, bool):  # a fill on the device, not a host-to-device copy
            apply = apply & torch.full((), not skip, dtype=torch.bool, device=self._home)
        elif skip is not None:
            apply = apply & ~skip.to(device=self._home, dtype=torch.bool)
        hook_inv = grad_scaler._scale.double().reciprocal() if amp else None
        grad_inv = hook_inv if scaled and amp else None
        for (grads, sq, mask), state, device in zip(
            blocks, self._states, self.layout.devices, strict=True
        ):
            take = mask & apply.to(device)
            if grad_inv is not None:
                sq = sq * grad_inv.to(device).square()
            state.update(grads, sq, take, grad_inv=grad_inv, hook_inv=hook_inv)
        self._present = torch.cat([mask.to(self._home) for _, _, mask in blocks])
        self._nonfinite = self._nonfinite + (~finite).to(torch.int64)
        self._consecutive = torch.where(finite, 0, self._consecutive + 1)
        self._skipped = self._skipped + (~apply).to(torch.int64)
        self.updates += 1
        self._read_token = self._token()
        self._refresh_factor()
        if self.logger is not None and self.updates % config.log_every == 0:
            self.logger(log_metrics(self), self.updates)
        if config.max_nonfinite_steps and self.updates % config.max_nonfinite_steps == 0:
            self._check_nonfinite()

    def _check_nonfinite(self) -> None:
        counters = torch.stack([self._consecutive, self._nonfinite])
        consecutive, total = counters.tolist()  # sync-ok: documented periodic check
        if total > self._nonfinite_seen:
            skipped = total - self._nonfinite_seen
            warnings.warn(
                f"{skipped} steps with non-finite gradients were skipped by the scaler",
                stacklevel=3,
            )
            self._nonfinite_seen = total
        limit = self.config.max_nonfinite_steps
        if limit and consecutive >= limit:
            raise FloatingPointError(
                f"{consecutive} consecutive steps had non-finite gradients (limit "
                f"max_nonfinite_steps={limit}); the scaler skipped them, but training is diverging"
            )

    def _totals(self) -> dict[str, torch.Tensor]:
        parts = [state.totals() for state in self._states]
        return {key: torch.cat([p[key].to(self._home) for p in parts]) for key in parts[0]}

    def _refresh_factor(self) -> None:
        config = self.config
        totals = self._totals()
        min_count = self._states[0].min_count
        include = self._present & (totals["count"] >= min_count)
        common = {
            "alpha": config.alpha, "beta": config.beta, "eps": config.eps,
            "min_scale": config.min_scale, "confidence": config.confidence,
            "min_count": min_count, "warm": self.updates > config.warmup_steps,
        }  # fmt: skip
        args = (totals["noise"], totals["signal"], totals["count"], include)
        summed = aggregate(*args, self._group_index, self._groups)
        result = scaling_factor(summed, self._previous, max_rate=config.max_rate, **common)
        self._previous = result["factor"]
        self._result = {**summed, **result}
        self._factor_per_tensor = result["factor"][self._group_index]
        if config.aggregate == "global":
            self._global = self._result
        else:
            overall = aggregate(*args, self._global_index, 1)
            self._global = {
                **overall,
                **scaling_factor(
                    overall, torch.ones_like(overall["noise"]), max_rate=None, **common
                ),
            }

    def step(
        self,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        scaled: bool = False,
        skip: torch.Tensor | bool | None = None,
    ) -> None:
        """Update the statistics if new gradients arrived since they were last read.

        Call it right after ``backward()`` (and AMP ``unscale_``). Called after
        ``optimizer.step()`` in the original's order, it finds no new gradients and reads
        nothing. A no-op when ``enabled`` is False.
        """
        if self.enabled and self._token() != self._read_token:
            self.update_statistics(grad_scaler=grad_scaler, scaled=scaled, skip=skip)

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
        multiply_gradients(self.layout, self._factor_per_tensor, self.config.aggregate == "global")
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
            raise ValueError(
                "apply_to='lr' needs the optimizer: pass it to apply() or the constructor"
            )
        self.step()
        groups = len(optimizer.param_groups)
        factors = self._previous
        if self.config.aggregate == "global":
            factors = factors.expand(groups)
        elif groups != self._groups:
            raise ValueError(
                f"optimizer has {groups} param groups but the scaler aggregates over {self._groups}"
            )
        with scaled_learning_rates(optimizer, factors):
            yield

    # ------------------------------------------------------------------- reads
    def get_scaling_factor(self) -> float:
        """The model-wide factor c (1.0 before any estimate). Host read (a sync)."""
        if not self.enabled or self._global is None:
            return 1.0
        return float(self._global["factor"][0])  # sync-ok: explicit host read

    def get_normalized_variance(self) -> float:
        """The model-wide ρ = noise/signal (nan: no estimate, inf: no signal). Host read."""
        if self._global is None or bool(
            self._global["no_estimate"][0]
        ):  # sync-ok: explicit host read
            return float("nan")
        return float(self._global["rho"][0])  # sync-ok: explicit host read

    def scaling_factors(self) -> torch.Tensor:
        """The applied factor of every aggregate (device tensor; no sync)."""
        return self._previous

    def statistics(self) -> dict[str, TensorStatistics]:
        """Per-tensor and aggregate statistics as host numbers (one host read).

        Keys: every parameter name, ``"global"``, and ``"group<k>"`` per param group when
        ``aggregate="param_group"``. See :class:`~gradstats.scaling.TensorStatistics`.
        """
        return build_statistics(self)

    # ------------------------------------------------------------- state
    def reset_statistics(self) -> None:
        """Forget all statistics (keeps configuration and parameters)."""
        self._build(self.layout)

    def state_dict(self) -> dict[str, object]:
        """Checkpoint keyed by parameter name (shape, dtype, statistic state), plus ``version``
        and ``config``; loadable with ``torch.load(weights_only=True)``."""
        return scaler_state(self)

    def load_state_dict(
        self,
        state_dict: dict[str, object],
        *,
        strict: bool = True,
        use_checkpoint_config: bool = False,
    ) -> LoadReport:
        """Restore a checkpoint. The constructor's configuration wins unless
        ``use_checkpoint_config=True``. With ``strict=True`` names or shapes that do not match
        are a ``ValueError`` listing them; ``strict=False`` skips them (with a warning)."""
        return load_scaler_state(
            self, state_dict, strict=strict, use_checkpoint_config=use_checkpoint_config
        )

    def rebind(self, params: object, optimizer: torch.optim.Optimizer | None = None) -> LoadReport:
        """Point the scaler at new parameter tensors (model/optimizer recreated), keeping the
        statistics of every name whose shape still matches. Returns what was kept/dropped."""
        state = self.state_dict()
        if optimizer is not None:
            self.optimizer = optimizer
        self._build(layout_from(params, optimizer))
        return load_scaler_state(self, state, strict=False, use_checkpoint_config=False, quiet=True)

    def update_parameters(self, params: object) -> LoadReport:
        """The original's name for :meth:`rebind`."""
        return self.rebind(params)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"VarianceGradientScaler(statistic={c.statistic!r}, alpha={c.alpha}, beta={c.beta}, "
            f"apply_to={c.apply_to!r}, aggregate={c.aggregate!r}, tensors={len(self.layout.names)})"
        )


def _stage_hook(owner: weakref.ref, state: SamePointState, index: int, grad: torch.Tensor) -> None:
    scaler = owner()
    if scaler is not None and scaler._capture:
        state.stage(index, grad)


def _commit_hook(owner: weakref.ref, state: SamePointState, index: int, _param) -> None:
    scaler = owner()
    if scaler is not None and scaler._capture:
        state.commit(index)
