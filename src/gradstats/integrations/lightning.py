"""PyTorch Lightning callbacks: the variance gradient scaler inside ``Trainer.fit``, and a Fisher
collected at the end of training (:class:`FisherCallback`).

Lightning runs, per optimizer step: training step and backward (``accumulate_grad_batches``
times), AMP unscale, ``on_before_optimizer_step``, gradient clipping, then the update. The
scaler reads its statistics in ``on_before_optimizer_step`` — raw gradients: accumulated,
unscaled, not yet clipped — and applies the factor to the learning rates for this one update
(``apply_to="lr"``, the default: Lightning users mostly run Adam-family optimizers). With
``apply_to="grad"`` the gradients are scaled at that point, i.e. *before* Lightning clips them.

Example::

    import lightning as L
    from gradstats.integrations.lightning import VarianceScalingCallback

    callback = VarianceScalingCallback(log_every=50)  # per_sample noise, AdaScale at S = 1
    L.Trainer(max_steps=1000, callbacks=[callback]).fit(module, datamodule)
    callback.scaler.statistics()["global"]
"""

from __future__ import annotations

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as error:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError(
        "gradstats.integrations.lightning needs PyTorch Lightning (pip install lightning)"
    ) from error

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch

from gradstats.errors import ConfigurationError
from gradstats.integrations._options import check_forwarded, with_model
from gradstats.scaling import VarianceGradientScaler

if TYPE_CHECKING:
    from gradstats.fisher import FisherCollector

__all__ = ["FisherCallback", "VarianceScalingCallback"]


class VarianceScalingCallback(Callback):
    """Runs a :class:`~gradstats.VarianceGradientScaler` in ``Trainer.fit``.

    Args:
        apply_to: ``"lr"`` (default) or ``"grad"`` (applied before Lightning's clipping).
        optimizer_index: which of ``trainer.optimizers`` to scale.
        scaler_kwargs: any other :class:`VarianceGradientScaler` argument (``statistic``,
            ``rule``, ``beta``, ``log_every``, ...). ``model`` defaults to the LightningModule
            when the statistic uses one (the default ``"auto"`` then is ``"per_sample"``). Its
            ``vgs/...`` metrics are logged with ``LightningModule.log_dict`` (so they reach
            the trainer's loggers).
    """

    def __init__(
        self, *, apply_to: str = "lr", optimizer_index: int = 0, **scaler_kwargs: Any
    ) -> None:
        super().__init__()
        check_forwarded(VarianceGradientScaler, scaler_kwargs, ("params", "optimizer", "logger"))
        self.scaler_kwargs: dict[str, Any] = {"apply_to": apply_to, **scaler_kwargs}
        self.optimizer_index = optimizer_index
        self.scaler: VarianceGradientScaler | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._grad_scaler: Any = None  # the precision plugin's torch.amp.GradScaler, if any
        self._module: Any = None  # the LightningModule being fitted
        self._context: AbstractContextManager[object] | None = None

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self._module is not None:
            self._module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.optimizer_index >= len(trainer.optimizers):
            raise ConfigurationError(
                f"optimizer_index={self.optimizer_index} but the trainer has "
                f"{len(trainer.optimizers)} optimizer(s)"
            )
        optimizer = trainer.optimizers[self.optimizer_index]
        self._optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
        self._grad_scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._module = pl_module
        options = with_model(self.scaler_kwargs, pl_module)  # statistic="auto" -> per_sample
        self.scaler = VarianceGradientScaler(
            pl_module.named_parameters(), optimizer=self._optimizer, logger=self._log, **options
        )

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        scaler, inner = self.scaler, self._optimizer
        if (
            scaler is None
            or inner is None
            or getattr(optimizer, "_optimizer", optimizer) is not inner
        ):
            return
        scaler.step(grad_scaler=self._grad_scaler)
        if scaler.config.apply_to == "grad":
            scaler.scale_gradients()
            return
        self._context = scaler.apply(inner)
        self._context.__enter__()

    def _restore(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._restore()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._restore()
        if self.scaler is not None:
            self.scaler.remove_hooks()


class FisherCallback(Callback):
    """Collects a diagonal Fisher at the end of ``Trainer.fit`` and saves it.

    In ``on_train_end`` a :class:`~gradstats.FisherCollector` runs over ``dataloader`` (model in
    ``eval()`` mode, batches moved to the module's device; see
    :mod:`gradstats.integrations._fisher` for sharding under DDP), rank 0 writes
    ``fisher.safetensors`` and the summary (``fisher/samples``, ``fisher/trace``, ...) goes to
    the trainer's loggers at the last global step.

    Args:
        dataloader: batches ``(inputs, targets)``, mappings (``labels`` = targets) or tensors.
        path: output file; default ``<trainer.default_root_dir>/fisher.safetensors``.
        model: the module to collect on: ``None`` (the LightningModule, called as
            ``pl_module(inputs)``), an attribute name (``"net"``) or a callable
            ``f(pl_module) -> nn.Module``.
        kind, likelihood, unit: as for :class:`~gradstats.FisherCollector`.
        max_batches: stop after this many batches (of all ranks together).
        loader_is_sharded: the loader already yields only this rank's share (DistributedSampler).
        collector_kwargs: any other :class:`~gradstats.FisherCollector` argument.

    After training, ``callback.collector`` (hooks removed) and ``callback.summary`` hold the
    result on every rank.

    Example::

        callback = FisherCallback(val_loader, likelihood="classification", max_batches=50)
        L.Trainer(max_epochs=3, callbacks=[callback]).fit(module, train_loader)
        callback.collector.group_fisher("mask")
    """

    def __init__(
        self,
        dataloader: Any,
        *,
        path: Any = None,
        model: Any = None,
        kind: str = "empirical",
        likelihood: object = "classification",
        unit: str = "sample",
        max_batches: int | None = None,
        loader_is_sharded: bool = False,
        **collector_kwargs: Any,
    ) -> None:
        from gradstats.integrations._fisher import check_options

        super().__init__()
        check_options(kind, likelihood, unit, max_batches, collector_kwargs)
        self.dataloader, self.path, self.model = dataloader, path, model
        self.kind, self.likelihood, self.unit = kind, likelihood, unit
        self.max_batches, self.loader_is_sharded = max_batches, loader_is_sharded
        self.collector_kwargs = collector_kwargs
        self.collector: FisherCollector | None = None
        self.summary: dict[str, float] = {}

    @property
    def options(self) -> dict[str, object]:
        """``{"kind", "likelihood", "unit"}`` as given."""
        return {"kind": self.kind, "likelihood": self.likelihood, "unit": self.unit}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        from pathlib import Path

        from gradstats.integrations._fisher import collect_after_training, resolve_module

        path = self.path or Path(trainer.default_root_dir) / "fisher.safetensors"
        self.collector, self.summary = collect_after_training(
            resolve_module(pl_module, self.model),
            self.dataloader,
            path=path,
            is_main=trainer.is_global_zero,
            max_batches=self.max_batches,
            loader_is_sharded=self.loader_is_sharded,
            collector_kwargs=self.collector_kwargs,
            kind=self.kind,
            likelihood=self.likelihood,
            unit=self.unit,
        )
        self.path = path
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.summary, step=trainer.global_step)
                logger.save()
