"""Hugging Face ``Trainer`` callbacks: the variance gradient scaler inside ``Trainer.train``, and a
Fisher collected at the end of training (:class:`FisherTrainerCallback`).

The ``Trainer`` offers no callback between the backward passes and gradient clipping, and with
fp16 it unscales the gradients only inside its clipping call. So the scaler is
:func:`~gradstats.scaling.attach`-ed: it reads the raw gradients when the *last* backward of
each optimizer step ends (accelerate's ``GradientState().sync_gradients``), dividing out the
fp16 loss scale itself, and applies its factor inside the optimizer's ``step()`` (learning rates
scaled for that step and restored, by default). Its ``vgs/...`` metrics join the Trainer's logs.

Example::

    from transformers import Trainer
    from gradstats.integrations.hf import VarianceScalingTrainerCallback, add_callback_first

    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    callback = add_callback_first(trainer, VarianceScalingTrainerCallback(log_every=20))
    trainer.train()

Add the callback with :func:`add_callback_first` so that the reporting integrations
(TensorBoard, W&B, ...) — which the Trainer registers before user callbacks — receive the
``vgs/...`` keys too.
"""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError(
        "gradstats.integrations.hf needs transformers (pip install transformers accelerate)"
    ) from error

from typing import TYPE_CHECKING, Any, TypeVar

from gradstats.errors import ConfigurationError
from gradstats.integrations._options import check_forwarded, with_model
from gradstats.scaling import Attachment, VarianceGradientScaler, attach

if TYPE_CHECKING:
    from gradstats.fisher import FisherCollector

C = TypeVar("C")

__all__ = ["FisherTrainerCallback", "VarianceScalingTrainerCallback", "add_callback_first"]


def add_callback_first(trainer: Any, callback: C) -> C:
    """Register ``callback`` before the Trainer's reporting callbacks; returns it."""
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


class VarianceScalingTrainerCallback(TrainerCallback):
    """Runs a :class:`~gradstats.VarianceGradientScaler` in ``Trainer.train``.

    Args:
        apply_to: ``"lr"`` (default; the Trainer's default optimizer is AdamW) or ``"grad"``.
        scaler_kwargs: any other :class:`VarianceGradientScaler` argument. ``batch_size``
            defaults to the samples per optimizer step on this process, ``model`` to the
            Trainer's model when the statistic uses one (the default ``"auto"`` then is
            ``"per_sample"``).
    """

    def __init__(self, *, apply_to: str = "lr", **scaler_kwargs: Any) -> None:
        check_forwarded(VarianceGradientScaler, scaler_kwargs, ("params", "optimizer", "logger"))
        self.scaler_kwargs: dict[str, Any] = {"apply_to": apply_to, **scaler_kwargs}
        self.scaler: VarianceGradientScaler | None = None
        self._attachment: Attachment | None = None
        self._latest: dict[str, float] = {}

    def _store(self, metrics: dict[str, float], step: int) -> None:
        self._latest = dict(metrics)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from accelerate.state import GradientState

        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        grad_scaler = getattr(optimizer, "scaler", None)
        options = dict(self.scaler_kwargs)
        options.setdefault(
            "batch_size", args.per_device_train_batch_size * args.gradient_accumulation_steps
        )
        options = with_model(options, model)  # statistic="auto" -> "per_sample"
        self.scaler = VarianceGradientScaler(
            model.named_parameters(), optimizer=inner, logger=self._store, **options
        )
        gradient_state = GradientState()
        self._attachment = attach(
            self.scaler,
            inner,
            update_on_backward=lambda: gradient_state.sync_gradients,
            grad_scaler=grad_scaler,
            scaled=grad_scaler is not None,
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._latest:
            logs.update(self._latest)
            if state.log_history:
                state.log_history[-1].update(self._latest)

    def on_train_end(self, args, state, control, **kwargs):
        if self._attachment is not None:
            self._attachment.remove()
            self._attachment = None
        if self.scaler is not None:
            self.scaler.remove_hooks()


class FisherTrainerCallback(TrainerCallback):
    """Collects a diagonal Fisher at the end of ``Trainer.train`` and saves it.

    In ``on_train_end`` a :class:`~gradstats.FisherCollector` runs over the data (model in
    ``eval()`` mode, batches moved to the model's device), the main process writes
    ``fisher.safetensors`` and the summary (``fisher/samples``, ``fisher/trace``, ...) is appended
    to ``state.log_history`` (and kept in ``callback.summary``).

    Args:
        dataloader: an iterable of batches (mappings with ``labels`` as the targets, as the
            Trainer's collators produce, or ``(inputs, targets)``), or ``"train"`` / ``"eval"``
            for the Trainer's own loaders (accelerate-prepared, hence already sharded per
            process).
        path: output file; default ``<args.output_dir>/fisher.safetensors``.
        kind, likelihood, unit: as for :class:`~gradstats.FisherCollector` (default: the
            empirical per-sequence Fisher of a causal LM).
        max_batches: stop after this many batches (of all processes together for a shared
            loader; per process for the Trainer's loaders).
        loader_is_sharded: a user loader that already yields only this process's share.
        collector_kwargs: any other :class:`~gradstats.FisherCollector` argument.

    Example::

        callback = FisherTrainerCallback("train", max_batches=100)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        trainer.train()
        callback.collector.group_fisher("mask")
    """

    def __init__(
        self,
        dataloader: Any = "train",
        *,
        path: Any = None,
        kind: str = "empirical",
        likelihood: object = "causal_lm",
        unit: str = "sample",
        max_batches: int | None = None,
        loader_is_sharded: bool = False,
        **collector_kwargs: Any,
    ) -> None:
        from gradstats.integrations._fisher import check_options

        check_options(kind, likelihood, unit, max_batches, collector_kwargs)
        if isinstance(dataloader, str) and dataloader not in ("train", "eval"):
            raise ConfigurationError(
                f"dataloader must be an iterable of batches, 'train' or 'eval'; got {dataloader!r}"
            )
        self.dataloader, self.path = dataloader, path
        self.kind, self.likelihood, self.unit = kind, likelihood, unit
        self.max_batches, self.loader_is_sharded = max_batches, loader_is_sharded
        self.collector_kwargs = collector_kwargs
        self.collector: FisherCollector | None = None
        self.summary: dict[str, float] = {}

    @property
    def options(self) -> dict[str, object]:
        """``{"kind", "likelihood", "unit"}`` as given."""
        return {"kind": self.kind, "likelihood": self.likelihood, "unit": self.unit}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from pathlib import Path

        from gradstats.integrations._fisher import collect_after_training

        loader, sharded = self.dataloader, self.loader_is_sharded
        if isinstance(loader, str):
            loader, sharded = kwargs.get(f"{loader}_dataloader"), True
            if loader is None:
                raise ConfigurationError(
                    f"FisherTrainerCallback(dataloader={self.dataloader!r}): the Trainer has no "
                    f"{self.dataloader} dataloader; pass an eval_dataset or a loader"
                )
        path = self.path or Path(args.output_dir) / "fisher.safetensors"
        self.collector, self.summary = collect_after_training(
            model,
            loader,
            path=path,
            is_main=state.is_world_process_zero,
            max_batches=self.max_batches,
            loader_is_sharded=sharded,
            collector_kwargs=self.collector_kwargs,
            kind=self.kind,
            likelihood=self.likelihood,
            unit=self.unit,
        )
        self.path = path
        state.log_history.append({**self.summary, "step": state.global_step})
