"""One estimate's fixed data: input, noise realisation, force closure; and gradient assembly.

:func:`prepare` injects the input once, draws the noise realisation once and builds the force
closure ``F(z) = model.force(z, x_in, noise)`` that every phase, JVP and VJP of the estimate
uses. It checks the model's outputs (shapes, dtypes, complex support) and that the force draws no
random numbers of its own. :func:`assemble` turns an adjoint estimate a into parameter gradients:
g = aᵀ ∂F/∂θ (through the clamp path for input-embedding parameters) + ∂L/∂θ (readout), in one
backward pass at the free state.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from gradstats.eqprop._autodiff import per_sample_norm
from gradstats.eqprop._module import EquilibriumModule, NoiseRealization, trainable
from gradstats.eqprop._settings import Settings, resolve_settings
from gradstats.eqprop._solvers import fixed_point
from gradstats.eqprop._stats import SolveStats
from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = [
    "Outcome",
    "Problem",
    "assemble",
    "complex_dtype_errors",
    "free_phase",
    "free_residual",
    "prepare",
    "relax",
]


def _accepts_noise(model: EquilibriumModule) -> bool:
    params = inspect.signature(model.force).parameters
    return "noise" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _rng_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


class Outcome(NamedTuple):
    """What an estimator's ``compute(problem, settings)`` returns: the state the gradient is
    evaluated at, the adjoint estimate a (``None``: the estimator returns ``grads`` itself), the
    stats of every phase, and the gradients and loss (``None``: assembled from a)."""

    state: torch.Tensor
    adjoint: torch.Tensor | None
    stats: dict[str, SolveStats]
    grads: dict[str, torch.Tensor] | None = None
    loss: torch.Tensor | None = None


@dataclass
class Problem:
    """Everything one estimate holds fixed (see module docstring)."""

    model: EquilibriumModule
    x: torch.Tensor
    y: torch.Tensor | None
    x_in: torch.Tensor
    noise: NoiseRealization | None
    z0: torch.Tensor
    z0_given: bool = False  # the caller passed z0 (else it is init_state(x_in))

    @property
    def target(self) -> torch.Tensor:
        """The target ``y`` (a free-phase-only problem, as in :func:`relax`, has none)."""
        if self.y is None:
            raise ConfigurationError("this problem has no target y: it was built for relax()")
        return self.y

    def force(self, z: torch.Tensor) -> torch.Tensor:
        """F(z; x_in, θ) with this estimate's noise realisation."""
        if self.noise is None:
            return self.model.force(z, self.x_in)
        return self.model.force(z, self.x_in, noise=self.noise)

    def force_with_input(self, z: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        if self.noise is None:
            return self.model.force(z, x_in)
        return self.model.force(z, x_in, noise=self.noise)

    def loss_grads(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """ℓ(z) = ∇_z L(z, y) for each state, in one backward pass.

        For a complex state this is the plain (holomorphic) derivative dL/dz, not PyTorch's
        conjugate convention.
        """
        with torch.enable_grad():
            leaves = [z.detach().requires_grad_(True) for z in states]
            values = [self.model.loss(z, self.target) for z in leaves]
            for z, value in zip(leaves, values, strict=True):
                if not isinstance(value, torch.Tensor) or value.dim() != 0:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                    raise ConfigurationError(
                        f"{self.model.describe()}.loss must return a scalar; got shape {shape}"
                    )
                if z.is_complex() and not value.is_complex():
                    raise ConfigurationError(
                        f"{self.model.describe()}.loss returned a real value for a complex "
                        "state: a holomorphic loss must be complex-analytic (use squares, not "
                        "abs()**2)"
                    )
            grads = torch.autograd.grad(values, leaves, [torch.ones_like(v) for v in values])
        return [g.conj() if z.is_complex() else g for g, z in zip(grads, leaves, strict=True)]

    def loss_grad(self, z: torch.Tensor) -> torch.Tensor:
        """ℓ(z) = ∇_z L(z, y)."""
        return self.loss_grads([z])[0]


def _check_state(model: EquilibriumModule, name: str, t: object, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ConfigurationTypeError(
            f"{model.describe()}.{name} must return a tensor; got {type(t).__name__}"
        )
    if t.shape != like.shape:
        raise ConfigurationError(
            f"{model.describe()}.{name} must return a tensor shaped like the state "
            f"{tuple(like.shape)}; got {tuple(t.shape)}"
        )


@contextlib.contextmanager
def complex_dtype_errors(active: bool, method: str, dtype: torch.dtype) -> Iterator[None]:
    """Turn torch's raw dtype error of a model that is not complex-ready into one that names the
    method and the cast (complex nudges β_k = r e^{2πik/N} relax a complex state)."""
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        if not active or not any(k in text for k in ("dtype", "Complex", "complex")):
            raise
        raise ConfigurationError(
            f"method={method!r} relaxes the nudged phases in complex arithmetic (state dtype "
            f"{dtype}); the model's force or loss combined that complex state with a real "
            f"tensor and torch refused ({text.splitlines()[0]}). Cast what the model combines "
            "with z to z's dtype inside force()/loss() (e.g. W.to(z.dtype), as the built-in "
            "models do), or use a real method such as 'aep'"
        ) from error


def _initial_state(
    model: EquilibriumModule, x_in: torch.Tensor, z0: torch.Tensor | None
) -> torch.Tensor:
    """``init_state(x_in)``, or the given ``z0`` once it is checked against it: same shape,
    dtype and device (else the force would fail with torch's raw error). A model without
    ``init_state`` that is always given ``z0`` is not checked."""
    if z0 is None:
        return model.init_state(x_in)
    try:
        expected = model.init_state(x_in)
    except NotImplementedError:
        return z0.detach()
    if isinstance(expected, torch.Tensor) and not z0.is_complex():  # complex: refused below
        _check_z0(model, z0, expected)
    return z0.detach()


def _check_z0(model: EquilibriumModule, z0: torch.Tensor, expected: torch.Tensor) -> None:
    for what, got, want in (
        ("shape", tuple(z0.shape), tuple(expected.shape)),
        ("dtype", z0.dtype, expected.dtype),
        ("device", z0.device, expected.device),
    ):
        if got != want:
            raise ConfigurationError(
                f"z0 has {what} {got} but {model.describe()}'s state for this x has {what} "
                f"{want} (init_state(inject(x))); pass a state like the one relax() returns"
            )


def prepare(
    model: EquilibriumModule,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    noise: NoiseRealization | None = None,
    generator: torch.Generator | None = None,
    z0: torch.Tensor | None = None,
    complex_check: bool = False,
) -> Problem:
    """Inject, draw noise once, build the force closure, and check the model's outputs."""
    if not isinstance(model, EquilibriumModule):
        raise ConfigurationTypeError(
            f"model must be an EquilibriumModule; got {type(model).__name__}"
        )
    if not isinstance(x, torch.Tensor):
        raise ConfigurationTypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if y is not None and not isinstance(y, torch.Tensor):
        raise ConfigurationTypeError(f"y must be a torch.Tensor; got {type(y).__name__}")
    if z0 is not None and not isinstance(z0, torch.Tensor):
        raise ConfigurationTypeError(f"z0 must be a torch.Tensor; got {type(z0).__name__}")
    if noise is not None and not isinstance(noise, NoiseRealization):
        raise ConfigurationTypeError(
            f"noise must be a NoiseRealization; got {type(noise).__name__}"
        )
    with torch.no_grad():
        x_in = model.inject(x)
        if noise is None:
            noise = model.sample_noise(x_in, generator)
        if noise is not None and not _accepts_noise(model):
            raise ConfigurationTypeError(
                f"{model.describe()}.sample_noise returned a NoiseRealization but its force "
                "takes no `noise` argument"
            )
        state = _initial_state(model, x_in, z0)
        if not isinstance(state, torch.Tensor) or state.dim() < 1:
            raise ConfigurationTypeError(
                f"{model.describe()}.init_state must return a [B, ...] tensor"
            )
        if state.is_complex():
            raise ConfigurationError("the free state must be real; complex states are internal")
        problem = Problem(model, x, y, x_in, noise, state, z0 is not None)
        before = _rng_states(state.device)
        f = problem.force(state)
        after = _rng_states(state.device)
        _check_state(model, "force", f, state)
        if any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)):
            raise ConfigurationError(
                f"{model.describe()}.force drew random numbers (the global RNG advanced): its "
                "force, JVP and VJP would see different noise. Sample noise once in "
                "sample_noise() and read it from the `noise` argument (and keep dropout off)"
            )
        if complex_check:
            complex_dtype = torch.promote_types(state.dtype, torch.complex64)
            with complex_dtype_errors(True, "holomorphic", complex_dtype):
                fc = problem.force(state.to(complex_dtype))
            if not isinstance(fc, torch.Tensor) or not fc.is_complex():
                raise ConfigurationError(
                    f"{model.describe()} declares holomorphic=True but its force returned a "
                    "real tensor for a complex state"
                )
    return problem


def assemble(
    problem: Problem, z: torch.Tensor, a: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """g = aᵀ ∂F/∂θ (incl. the clamp path through ``inject``) + ∂L/∂θ at the state ``z``.

    Returns:
        ``(grads, loss)``: grads by parameter name (zeros for parameters the loss does not
        reach), and L(z).
    """
    model = problem.model
    names, params = trainable(model)
    with torch.enable_grad():
        zd = z.detach()
        loss = model.loss(zd, problem.target)
        total = loss
        if a is not None:
            x_in = model.inject(problem.x)
            total = total + (a.detach() * problem.force_with_input(zd, x_in)).sum()
        grads = torch.autograd.grad(total, params, allow_unused=True)
    out = {
        n: torch.zeros_like(p) if g is None else g
        for n, p, g in zip(names, params, grads, strict=True)
    }
    return out, loss.detach()


def relax(
    model: EquilibriumModule,
    x: torch.Tensor,
    *,
    z0: torch.Tensor | None = None,
    noise: NoiseRealization | None = None,
    generator: torch.Generator | None = None,
    step_size: float | None = None,
    tol: float | None = None,
    max_steps: int | None = None,
    check_every: int | None = None,
    anderson: int | None = None,
    freeze: bool | None = None,
    divergence_factor: float | None = None,
    stall_checks: int | None = None,
) -> tuple[torch.Tensor, SolveStats]:
    """Relax the free phase: z ← z + ε F(z; x) until ‖F(z)‖/‖z‖ ≤ tol per sample.

    The same call (same settings) is what estimators use for their free phase, so evaluating a
    model with ``relax`` sees exactly the state its gradients were computed at. Settings default
    to the model's ``solver_defaults``, then the library's (see ``estimate_gradient``);
    ``tol=0`` runs exactly ``max_steps`` steps. The residual is checked (one host read) at steps
    0, 1, 2, 4, … below ``check_every`` and at every multiple of it, so a fast phase stops within
    a few steps of converging (see :func:`~gradstats.eqprop._iterate.iterate`).

    Returns:
        ``(z, stats)``: the state (no autograd graph) and its :class:`SolveStats`.

    Raises:
        DivergenceError: the relaxation diverged (NaN/inf or a growing residual).

    Example:
        >>> from gradstats.eqprop.models import TanhModel
        >>> model = TanhModel.random(6, 3, 2, generator=torch.Generator().manual_seed(0))
        >>> z, stats = relax(model, torch.randn(4, 3, dtype=torch.float64), tol=1e-10)
        >>> bool(stats.converged.all()), stats.kind
        (True, 'free')
    """
    problem = prepare(model, x, None, noise=noise, generator=generator, z0=z0)
    s = resolve_settings(
        "implicit",
        model.solver_defaults,
        problem.z0.dtype,
        step_size=step_size,
        tol=tol,
        max_steps=max_steps,
        check_every=check_every,
        anderson=anderson,
        freeze=freeze,
        divergence_factor=divergence_factor,
        stall_checks=stall_checks,
    )
    return free_phase(problem, s)


def free_phase(problem: Problem, s: Settings) -> tuple[torch.Tensor, SolveStats]:
    """The free relaxation of ``problem`` with resolved settings ``s`` (no graph)."""
    with torch.no_grad():
        return fixed_point(problem.force, problem.z0, **s.free_phase_options())


def free_residual(problem: Problem, z: torch.Tensor) -> torch.Tensor:
    """‖F(z)‖/‖z‖ per sample (for reports)."""
    with torch.no_grad():
        tiny = torch.finfo(z.dtype).tiny
        return per_sample_norm(problem.force(z)) / per_sample_norm(z).clamp_min(tiny)
