"""What a solve and an estimate report: per-phase residual statistics, warnings, errors.

Every phase (free relaxation, adjoint solve, nudged phases, BPTT unroll) returns a
:class:`SolveStats` that names *which* residual it measured (``kind``), so a free-phase residual
can never be read as a nudged/adjoint one. :class:`GradientEstimate` bundles the gradients, the
adjoint estimate, the state they were computed at and the statistics of every phase.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from gradstats.eqprop._module import NoiseRealization
from gradstats.errors import ConfigurationError, ConfigurationTypeError, DivergenceError

__all__ = [
    "RESIDUAL_KINDS",
    "ConvergenceWarning",
    "DivergenceError",
    "GradientEstimate",
    "SolveStats",
    "write_grads",
]

#: The residual each phase measures (``SolveStats.kind``), written out.
RESIDUAL_KINDS: dict[str, str] = {
    "free": "‖F(z)‖/‖z‖ per sample",
    "adjoint": "‖Jᵀλ + ℓ‖/‖ℓ‖ per sample",
    "contrast": "‖r_a‖/‖ℓ‖ per sample, r_a = −Re Σ_k w_k F̃_k(z_k)/β_k ≈ Jᵀa + ℓ",
    "one-sided": "‖F_β(z_β)‖/(β‖ℓ‖) per sample (the one-sided contrast ≈ Ja + ℓ)",
}


class ConvergenceWarning(RuntimeWarning):
    """A phase stopped at its step cap before reaching its tolerance (``converged=False``)."""


@dataclass
class SolveStats:
    """Residuals and steps of one phase; tensors live on the data's device.

    Attributes:
        phase: ``"free"``, ``"adjoint"``, ``"nudged"`` or ``"bptt"``.
        kind: which residual was measured: a key of :data:`RESIDUAL_KINDS`.
        steps: ``[B]`` int64, updates applied to each sample (frozen samples stop counting).
        converged: ``[B]`` bool, final residual ≤ ``tol``.
        final_residual: ``[B]`` residual of the returned state.
        trace: ``[n_checks, B]`` residuals at the checks (every ``check_every`` steps).
        trace_steps: the step index of each row of ``trace``.
        tol: the tolerance the phase stopped on (0: ran exactly ``max_steps``).
        max_steps: the step cap.
        diverged: ``[B]`` bool (always False in a returned stats: divergence raises).
        extra: phase-specific numbers (e.g. ``radius_ratio`` of holomorphic phases).
    """

    phase: str
    kind: str
    steps: torch.Tensor
    converged: torch.Tensor
    final_residual: torch.Tensor
    trace: torch.Tensor
    trace_steps: tuple[int, ...]
    tol: float
    max_steps: int
    diverged: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def description(self) -> str:
        """The measured residual, written out."""
        return RESIDUAL_KINDS[self.kind]

    def all_converged(self) -> bool:
        """Whether every sample converged (reads one bool from the device)."""
        return bool(self.converged.all())  # sync-ok: reporting, not per step

    def summary(self) -> dict[str, object]:
        """Plain Python numbers for logs and JSON (one host read)."""
        res = self.final_residual.detach().double().cpu()
        out: dict[str, object] = {
            "phase": self.phase,
            "kind": self.kind,
            "residual_max": float(res.max()) if res.numel() else 0.0,
            "residual_mean": float(res.mean()) if res.numel() else 0.0,
            "steps_max": int(self.steps.max()) if self.steps.numel() else 0,
            "converged_fraction": float(self.converged.double().mean()) if res.numel() else 1.0,
            "tol": self.tol,
            "max_steps": self.max_steps,
        }
        for key, value in self.extra.items():
            value = torch.as_tensor(value).detach().double().cpu()
            out[key] = float(value.max()) if value.numel() else math.nan
        return out


def write_grads(model: nn.Module, grads: Mapping[str, torch.Tensor], accumulate: bool = False):
    """Write ``grads`` (by parameter name) into ``param.grad`` of ``model``.

    Args:
        model: the module the names refer to.
        grads: ``{name: tensor shaped like the parameter}``.
        accumulate: add to an existing ``.grad`` instead of replacing it.

    Raises:
        ConfigurationError: a name is not a parameter of ``model`` or a shape differs (nothing
            written).
    """
    params = dict(model.named_parameters())
    for name, grad in grads.items():
        if name not in params:
            raise ConfigurationError(f"grads has {name!r}, which is not a parameter of the model")
        if not isinstance(grad, torch.Tensor):
            raise ConfigurationTypeError(
                f"grads[{name!r}] must be a torch.Tensor; got {type(grad).__name__}"
            )
        if grad.shape != params[name].shape:
            raise ConfigurationError(
                f"grads[{name!r}] has shape {tuple(grad.shape)}; the parameter has "
                f"{tuple(params[name].shape)}"
            )
    for name, grad in grads.items():
        param = params[name]
        grad = grad.detach().to(param.dtype)
        if accumulate and param.grad is not None:
            param.grad.add_(grad)
        else:
            param.grad = grad.clone()


@dataclass
class GradientEstimate:
    """The result of :func:`~gradstats.eqprop.estimate_gradient`.

    Attributes:
        method: the estimator that produced it.
        grads: ``{param_name: gradient}`` for every trainable parameter (zeros where the loss
            does not depend on it). Readout parameters get the direct ∂L/∂θ, force parameters
            aᵀ∂F/∂θ, input-embedding parameters aᵀ∂F/∂x_in · ∂x_in/∂θ (the clamp path).
        adjoint: the adjoint estimate a (λ for ``implicit``; ``None`` for ``bptt``).
        state: the free state z the gradient refers to (the same state a validation pass with
            the same settings evaluates).
        loss: L(state, y).
        stats: ``{phase: SolveStats}`` for every phase that ran.
        settings: the resolved settings (explicit > model defaults > library defaults).
        noise: the noise realisation used by every force, JVP and VJP of this estimate.
        skipped: True if the estimate was abandoned (divergence or non-finite values with
            ``nonfinite="skip"``); then ``grads`` are zeros and :meth:`write_grads` is a no-op.
        reason: why it was skipped.
        task_grads: the pure task gradients when penalties were added (``grads`` is then the
            total); ``None`` otherwise.
        penalties: ``{name: {"value": P, "scale": s}}`` of the penalties added.
    """

    method: str
    grads: dict[str, torch.Tensor]
    adjoint: torch.Tensor | None
    state: torch.Tensor | None
    loss: torch.Tensor | None
    stats: dict[str, SolveStats]
    settings: dict[str, object]
    noise: NoiseRealization | None = None
    skipped: bool = False
    reason: str | None = None
    task_grads: dict[str, torch.Tensor] | None = None
    penalties: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def converged(self) -> bool:
        """Whether every phase converged for every sample (one host read per phase)."""
        return all(s.all_converged() for s in self.stats.values() if s.phase != "bptt")

    def write_grads(self, model: nn.Module, accumulate: bool = False) -> bool:
        """Write :attr:`grads` into ``.grad``; returns False (and writes nothing) if skipped."""
        if self.skipped:
            return False
        write_grads(model, self.grads, accumulate=accumulate)
        return True
