"""Hugging Face ``Trainer`` callbacks: the variance gradient scaler inside ``Trainer.train``.

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

from gradstats.scaling import Attachment, VarianceGradientScaler, attach

__all__ = ["VarianceScalingTrainerCallback", "add_callback_first"]


def add_callback_first(trainer, callback):
    """Register ``callback`` before the Trainer's reporting callbacks; returns it."""
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


class VarianceScalingTrainerCallback(TrainerCallback):
    """Runs a :class:`~gradstats.VarianceGradientScaler` in ``Trainer.train``.

    Args:
        apply_to: ``"lr"`` (default; the Trainer's default optimizer is AdamW) or ``"grad"``.
        scaler_kwargs: any other :class:`VarianceGradientScaler` argument. ``batch_size``
            defaults to the samples per optimizer step on this process.
    """

    def __init__(self, *, apply_to: str = "lr", **scaler_kwargs) -> None:
        self.scaler_kwargs = {"apply_to": apply_to, **scaler_kwargs}
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
