"""stable-baselines3 integration: the scaler inside PPO / A2C gradient updates.

The original scaler lived in a PPO trainer. Here it is a callback::

    from stable_baselines3 import PPO
    from gradstats.integrations.sb3 import VarianceScalingCallback

    model = PPO("MlpPolicy", "CartPole-v1")
    callback = VarianceScalingCallback(apply_to="lr")
    model.learn(50_000, callback=callback)
    callback.scaler.statistics()["global"]

At training start it builds a :class:`~gradstats.VarianceGradientScaler` on the policy's named
parameters and :func:`~gradstats.scaling.attach`-es it to the policy optimizer: statistics are
read when each minibatch backward ends (before PPO clips the gradient norm), the factor is applied
in ``optimizer.step()``, and the ``vgs/...`` metrics go to the algorithm's logger. SB3's default
optimizers are adaptive (Adam, RMSprop), so ``apply_to="lr"`` is the default here.
"""

from __future__ import annotations

from typing import Any

try:
    from stable_baselines3.common.callbacks import BaseCallback
except ImportError as error:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError(
        "gradstats.integrations.sb3 needs stable-baselines3 (pip install stable-baselines3)"
    ) from error

from gradstats.integrations._options import with_model
from gradstats.scaling._integrations import Attachment, attach
from gradstats.scaling._scaler import VarianceGradientScaler

__all__ = ["VarianceScalingCallback"]


class VarianceScalingCallback(BaseCallback):
    """Runs a :class:`VarianceGradientScaler` in an SB3 algorithm's updates.

    Args:
        apply_to: ``"lr"`` (default: SB3's optimizers are adaptive) or ``"grad"``.
        verbose: SB3 verbosity.
        scaler_kwargs: any other :class:`VarianceGradientScaler` argument (``statistic``,
            ``rule``, ``beta``, ``log_every``, ...). ``batch_size`` defaults to the algorithm's;
            ``model`` to the policy when the statistic uses one (the default ``"auto"`` then
            is ``"per_sample"``; with the default ``rule="adascale"`` at S = 1 the updates are
            PPO's own, and the scaler measures and logs the noise, B_noise and
            ``suggested_batch_size``).
    """

    def __init__(self, *, apply_to: str = "lr", verbose: int = 0, **scaler_kwargs: object) -> None:
        super().__init__(verbose)
        self.scaler_kwargs = {"apply_to": apply_to, **scaler_kwargs}
        self.scaler: VarianceGradientScaler | None = None
        self._attachment: Attachment | None = None

    def _record(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.logger.record(key, value)

    def _on_training_start(self) -> None:
        policy = self.model.policy
        kwargs: dict[str, Any] = dict(self.scaler_kwargs)
        kwargs.setdefault("batch_size", getattr(self.model, "batch_size", None))
        kwargs = with_model(kwargs, policy)  # statistic="auto" -> "per_sample"
        self.scaler = VarianceGradientScaler(
            policy.named_parameters(), optimizer=policy.optimizer, logger=self._record, **kwargs
        )
        self._attachment = attach(self.scaler, policy.optimizer)

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        if self._attachment is not None:
            self._attachment.remove()
            self._attachment = None
