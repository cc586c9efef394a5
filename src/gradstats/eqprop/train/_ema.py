"""Parameter EMA (``--ema-decay d``): the averaged weights used to evaluate a run.

After every optimizer step that was taken (skipped steps do not count), with n such steps so
far and θ_n the trainable parameters after the n-th,

    m_n = d·m_{n−1} + (1 − d)·θ_n   (m_0 = 0),    θ_ema = m_n / (1 − d^n),

the zero-initialised, debiased EMA: θ_ema = Σ_{k=1..n} w_k θ_k with
w_k = (1 − d)·d^{n−k}/(1 − d^n), Σ w_k = 1 — the initialisation θ_0 carries no weight (before
the first step θ_ema = θ_0). d = 0 gives θ_ema = θ_n. Buffers (e.g. masks) are the model's.

Where it is used: validation (``val_ce`` is the EMA model's; ``val_ce_raw`` the trained
weights'), and every reader of a run folder through
:func:`~gradstats.eqprop.train.build_from_checkpoint` — probing, sampling and Fisher — unless
asked for ``weights="raw"``. Training, the spot check and resumes use the trained weights.

Checkpoint key ``ema``: ``{"decay": d, "count": n, "params": {name: m_n}}`` (the raw buffer in
the run's dtype, so a resume continues bitwise).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, TypeVar

import torch

from gradstats.errors import StateError

__all__ = ["ParameterEMA", "check_ema_state", "ema_weights"]

_Model = TypeVar("_Model", bound=torch.nn.Module)


class ParameterEMA:
    """The debiased EMA of ``model``'s trainable parameters (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.count = 0
        self.params = {
            n: torch.zeros_like(p.detach()) for n, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """m ← d·m + (1 − d)·θ for every trainable parameter (after an optimizer step)."""
        named = dict(model.named_parameters())
        for name, buf in self.params.items():
            buf.mul_(self.decay).add_(named[name].detach(), alpha=1 - self.decay)
        self.count += 1

    def averaged(self) -> dict[str, torch.Tensor]:
        """θ_ema by parameter name (empty before the first update)."""
        return _debiased(self.params, self.decay, self.count)

    def model(self, model: _Model) -> _Model:
        """A copy of ``model`` holding θ_ema (``model`` itself before the first update)."""
        if not self.count:
            return model
        out = copy.deepcopy(model)
        out.load_state_dict(self.averaged(), strict=False)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "count": self.count,
                "params": {n: t.clone() for n, t in self.params.items()}}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_ema_state(state, self.params)
        self.count = int(state["count"])
        for name, buf in self.params.items():
            buf.copy_(state["params"][name])


def _debiased(params: Mapping[str, torch.Tensor], decay: float, count: int):
    if not count:
        return {}
    return {n: m / (1 - decay**count) for n, m in params.items()}


def check_ema_state(state: object, expected: Mapping[str, torch.Tensor] | None = None) -> None:
    """Raise a :class:`~gradstats.errors.StateError` unless ``state`` is an EMA state (fitting
    ``expected``'s names, shapes and dtypes when given)."""
    if not isinstance(state, Mapping) or not {"decay", "count", "params"} <= set(state):
        raise StateError("the checkpoint's ema state is not a parameter-EMA state_dict")
    count, decay, params = state["count"], state["decay"], state["params"]
    ok = isinstance(count, int) and not isinstance(count, bool) and count >= 0
    ok = ok and isinstance(decay, float) and 0 <= decay < 1 and isinstance(params, Mapping)
    if not ok or not all(isinstance(t, torch.Tensor) for t in params.values()):
        raise StateError("the checkpoint's ema state is not a parameter-EMA state_dict")
    if expected is None:
        return
    if set(params) != set(expected) or any(
        params[n].shape != t.shape or params[n].dtype != t.dtype for n, t in expected.items()
    ):
        raise StateError("the checkpoint's EMA weights do not fit the model's parameters")


def ema_weights(state: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """θ_ema from a checkpoint dict (``None``: no EMA, or no update yet)."""
    ema = state.get("ema")
    if ema is None:
        return None
    check_ema_state(ema)
    return _debiased(ema["params"], ema["decay"], ema["count"]) if ema["count"] else None
