"""The model contract: a fixed-point system F(z; x, θ) = 0 with a loss L(z, y).

A model subclasses :class:`EquilibriumModule` and defines ``init_state``, ``force`` and ``loss``.
Optional hooks: ``inject`` (input embedding; its parameters get gradients through the clamp
path), ``sample_noise`` (a :class:`NoiseRealization` drawn once per estimate and passed to every
force, JVP and VJP), ``parameter_groups`` (for per-group reports), ``supported_methods`` (an
estimator the model or its current mode does not support is rejected by name), ``config`` (what
the probe echoes), ``solver_defaults`` (step size, tolerances, β, ... of this model) and
``higher_order`` (a block in which ``force`` is differentiable to every order: the stabiliser
penalties differentiate Jacobian products w.r.t. the parameters, a third derivative).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from gradstats.eqprop._registry import ESTIMATORS
from gradstats.errors import ConfigurationError

__all__ = [
    "EquilibriumModule",
    "NoiseRealization",
    "model_fingerprint",
    "trainable",
]


@dataclass(frozen=True)
class NoiseRealization:
    """One sampled noise realisation: plain tensors, drawn once per estimate.

    The force receives it as ``noise=``; the library passes the *same* object to the free phase,
    every nudged phase, every JVP and every VJP of an estimate, so the Jacobian the AEP correction
    and the adjoint use is the Jacobian of the force that moves the state. Forces must not draw
    random numbers themselves (``estimate_gradient`` checks the global RNG is untouched).

    Attributes:
        tensors: ``{name: tensor}`` (e.g. a multiplicative mask per layer).
        seed: the seed it was drawn from, if any (recorded for reproducibility).
    """

    tensors: Mapping[str, torch.Tensor]
    seed: int | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def to(self, *args, **kwargs) -> NoiseRealization:
        """A copy with every tensor moved/cast like ``Tensor.to`` (floating tensors only cast)."""
        moved = {}
        for name, t in self.tensors.items():
            if t.is_floating_point() or t.is_complex():
                moved[name] = t.to(*args, **kwargs)
            else:
                device = [a for a in args if isinstance(a, (str, torch.device))]
                moved[name] = t.to(device[0]) if device else t
        return NoiseRealization(moved, self.seed)


class EquilibriumModule(nn.Module):
    """Base class of fixed-point models: relaxation z ← z + ε F(z; x, θ) to F(z*) = 0.

    Subclasses define:

    * ``init_state(x)``: the initial state z₀, a tensor whose first dimension is the batch.
    * ``force(z, x, noise=None)``: F(z; x, θ), shaped like ``z``. ``x`` is the output of
      :meth:`inject`. Models that never use noise may omit the ``noise`` argument.
    * ``loss(z, y)``: the scalar objective L (readout inside). Readout parameters get ∂L/∂θ.

    Conventions the estimators rely on:

    * each sample's force depends only on that sample's state (no coupling across the batch);
    * ``holomorphic = True`` promises that ``force`` and ``loss`` accept complex ``z`` and are
      complex-analytic in it (squares, not ``abs()**2``; see :mod:`gradstats.eqprop.holo_ops`),
      equal to the real functions on the real axis;
    * randomness only through :meth:`sample_noise` (never inside ``force``).

    Class attributes:
        holomorphic: whether the complex extension exists (``method="holomorphic"``).
        solver_defaults: this model's defaults for any :func:`estimate_gradient` setting
            (``step_size``, ``tol``, ``tol_adjoint``, ``max_steps``, ``beta``, ``points``, ...);
            unknown keys are rejected when an estimate is made.
        jvp_mode: ``"reverse"`` (double backward) or ``"forward"`` (``torch.func.jvp``) for the
            Jacobian-vector products of the AEP correction.
        mode: optional name of the model's current dynamics, used in error messages.
    """

    # Class-level defaults a subclass (or an instance, e.g. per mode) may override.
    holomorphic: bool = False
    solver_defaults: Mapping[str, object] = MappingProxyType({})
    jvp_mode: str = "reverse"
    mode: str | None = None

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        """Initial state z₀ for the (injected) input ``x``."""
        raise NotImplementedError(f"{type(self).__name__} must define init_state(x)")

    def _undefined_force(
        self, z: torch.Tensor, x: torch.Tensor, noise: NoiseRealization | None = None
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define force(z, x)")

    #: The force F(z; x, θ) (shaped like ``z``): ``force(z, x)`` or ``force(z, x, noise=None)``
    #: — a model that never uses noise may omit the argument, so the type is open.
    force: Callable[..., torch.Tensor] = _undefined_force

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The scalar loss L(z, y)."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(z, y)")

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        """Input injection x_in (e.g. token + position embeddings); default: ``x`` itself."""
        return x

    def sample_noise(
        self, x: torch.Tensor, generator: torch.Generator | None
    ) -> NoiseRealization | None:
        """Draw the noise realisation of one estimate (default: no noise)."""
        return None

    def higher_order(self) -> contextlib.AbstractContextManager[None]:
        """Within the block ``force`` must have exact derivatives of every order (the
        penalties of ``gradstats.eqprop.penalty_value`` differentiate Jv and Jᵀv w.r.t. the
        parameters). The default does nothing: a force of plain differentiable ops qualifies.
        Override it where the force uses fused ops whose derivatives are exact only to second
        order — PyTorch's ``layer_norm`` and training-mode ``batch_norm`` save their statistics
        without history, so the third derivative is silently wrong (pytorch/pytorch#175754,
        #186256) — and evaluate them from primitive ops inside it."""
        return contextlib.nullcontext()

    def supported_methods(self) -> tuple[str, ...]:
        """Estimators this model (in its current mode) supports: by default every registered
        estimator whose model kinds include this model's (``holomorphic`` needs
        ``holomorphic = True``). Override to restrict further."""
        return tuple(name for name, e in ESTIMATORS.items() if e.supports(self))

    def parameter_groups(self) -> dict[str, list[str]]:
        """``{group: [parameter names]}``; default: by the first component of the name."""
        groups: dict[str, list[str]] = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                groups.setdefault(name.split(".", 1)[0], []).append(name)
        return groups

    def config(self) -> dict[str, object]:
        """The settings that define this model's dynamics (echoed by the probe)."""
        return {}

    def describe(self) -> str:
        """``ClassName`` or ``ClassName(mode='...')``, as used in error messages."""
        name = type(self).__name__
        return name if self.mode is None else f"{name}(mode={self.mode!r})"


def trainable(model: nn.Module) -> tuple[tuple[str, ...], tuple[nn.Parameter, ...]]:
    """Names and parameters of ``model`` that require gradients (in registration order)."""
    pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not pairs:
        raise ConfigurationError(f"{type(model).__name__} has no parameters that require gradients")
    return tuple(n for n, _ in pairs), tuple(p for _, p in pairs)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the class name, ``config()`` and every parameter/buffer (name, dtype, bytes)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = model.config() if isinstance(model, EquilibriumModule) else {}
    digest.update(repr(sorted(config.items())).encode())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        t = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
