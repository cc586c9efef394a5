"""``estimate_gradient``: one entry point for every estimator, each reporting its residuals.

Importing this package registers every estimator (:mod:`gradstats.eqprop._registry`) in the
order of :data:`METHODS`; ``estimate_gradient`` resolves the settings against the estimator's
declaration and calls its ``compute``.
"""

from __future__ import annotations

import torch

from gradstats._warnings import deprecated_alias
from gradstats.eqprop._estimators._phases import AnalyticityWarning
from gradstats.eqprop._estimators.aep import AEP
from gradstats.eqprop._estimators.bptt import BPTT
from gradstats.eqprop._estimators.ep import EP, EP_SYMMETRIC
from gradstats.eqprop._estimators.holo import HOLOMORPHIC
from gradstats.eqprop._estimators.implicit import IMPLICIT
from gradstats.eqprop._module import EquilibriumModule, NoiseRealization
from gradstats.eqprop._problem import assemble, prepare
from gradstats.eqprop._registry import ESTIMATORS, Estimator, Options, get_estimator, register
from gradstats.eqprop._settings import SolverSettings, library_defaults, resolve_settings
from gradstats.eqprop._stats import DivergenceError, GradientEstimate
from gradstats.errors import (
    ConfigurationError,
    ConfigurationTypeError,
    NonFinitePolicy,
    check_nonfinite,
)

__all__ = [
    "ESTIMATORS",
    "LIBRARY_DEFAULTS",
    "METHODS",
    "AnalyticityWarning",
    "check_method_supported",
    "estimate_gradient",
    "get_estimator",
    "supported_estimators",
]

register(IMPLICIT, BPTT, EP, EP_SYMMETRIC, AEP, HOLOMORPHIC)
#: Every estimator ``estimate_gradient`` knows (the names of :data:`ESTIMATORS`).
METHODS = tuple(ESTIMATORS)
#: Library defaults of every setting (``tol``/``tol_adjoint`` per dtype, ``beta`` per method).
LIBRARY_DEFAULTS = library_defaults()


def check_method_supported(model: EquilibriumModule, method: str) -> Estimator:
    """The estimator ``method`` if ``model`` supports it; otherwise raise a
    :class:`~gradstats.errors.ConfigurationError` (a ``ValueError``) naming the method and the
    model/mode."""
    estimator = get_estimator(method)
    if not isinstance(model, EquilibriumModule):
        raise ConfigurationTypeError(
            f"model must be an EquilibriumModule; got {type(model).__name__}"
        )
    if not estimator.supports(model):
        raise ConfigurationError(
            f"method={method!r} needs a force and loss that accept complex states, but "
            f"{model.describe()} declares holomorphic=False"
        )
    if "real" not in estimator.model_kinds and any(p.is_complex() for p in model.parameters()):
        raise ConfigurationError(
            f"method={method!r} needs real parameters (it relaxes only one phase of each "
            f"conjugate pair, z(conj β) = conj z(β)); {model.describe()} has complex parameters"
        )
    supported = tuple(model.supported_methods())
    if method not in supported:
        raise ConfigurationError(
            f"method={method!r} is not supported by {model.describe()}; it supports "
            f"{', '.join(repr(m) for m in supported)}"
        )
    return estimator


def supported_estimators(model: EquilibriumModule) -> tuple[Estimator, ...]:
    """The registered estimators ``model`` (in its current mode) supports."""
    names = set(model.supported_methods())
    return tuple(e for e in ESTIMATORS.values() if e.name in names and e.supports(model))


def _with_records(
    estimator: Estimator,
    keywords: dict[str, object],
    solver: SolverSettings | None,
    options: Options | None,
) -> dict[str, object]:
    """The explicit settings: the keywords merged with the ``solver``/``options`` records (a
    setting given both ways is an error)."""
    if solver is not None and not isinstance(solver, SolverSettings):
        raise ConfigurationTypeError(
            f"solver must be a SolverSettings; got {type(solver).__name__}"
        )
    if options is not None and not isinstance(options, estimator.options):
        raise ConfigurationTypeError(
            f"options of method={estimator.name!r} must be a {estimator.options.__name__}; "
            f"got {type(options).__name__}"
        )
    out = dict(keywords)
    for record in (solver, options):
        for key, value in ({} if record is None else record.given()).items():
            if keywords.get(key) is not None:
                raise ConfigurationError(f"{key} is given as a keyword and in a settings record")
            out[key] = value
    return out


def _finite(grads: dict[str, torch.Tensor]) -> bool:
    flags = torch.stack([torch.isfinite(g).all() for g in grads.values()])
    return bool(flags.all())  # sync-ok: once per estimate, so no NaN ever reaches .grad


def estimate_gradient(
    model: EquilibriumModule,
    x: torch.Tensor,
    y: torch.Tensor,
    method: str = "aep",
    *,
    beta: float | None = None,
    points: int | None = None,
    anchor: str | None = None,
    correction: bool | None = None,
    steps: int | None = None,
    step_size: float | None = None,
    tol: float | None = None,
    tol_adjoint: float | None = None,
    max_steps: int | None = None,
    max_steps_adjoint: int | None = None,
    check_every: int | None = None,
    anderson: int | None = None,
    adjoint_solver: str | None = None,
    gmres_restart: int | None = None,
    freeze: bool | None = None,
    divergence_factor: float | None = None,
    stall_checks: int | None = None,
    noise: NoiseRealization | None = None,
    generator: torch.Generator | None = None,
    z0: torch.Tensor | None = None,
    nonfinite: NonFinitePolicy | None = None,
    on_failure: NonFinitePolicy | None = None,
    solver: SolverSettings | None = None,
    options: Options | None = None,
) -> GradientEstimate:
    """Estimate dL/dθ of an equilibrium model with one of six estimators.

    | method | adjoint estimate a | exact when |
    |---|---|---|
    | ``implicit`` | λ solving Jᵀλ = −ℓ to ``tol_adjoint`` | free and adjoint converged |
    | ``bptt`` | autograd through exactly ``steps`` steps | defines the finite-T objective |
    | ``ep`` | (z* − z_β)/β | J symmetric; bias O(β) |
    | ``ep_symmetric`` | (z_{−β} − z_{+β})/(2β) | J symmetric; bias O(β²) |
    | ``aep`` | symmetric contrast under F − (J − Jᵀ)v − β∇L | any J; bias O(β²) |
    | ``holomorphic`` | −Re (1/N) Σ_k (z_{β_k} − z*)/β_k | holomorphic model; O((r/R)^N) |

    Then g = aᵀ ∂F/∂θ + ∂L/∂θ at the free state (one backward), which also reaches
    input-embedding parameters through the clamp (∂F/∂x_in) and readout parameters (∂L/∂θ).
    Nudge sign: F_β = F − β∇L (β > 0 lowers the loss).

    Args:
        model: an :class:`EquilibriumModule`.
        x, y: input (passed to ``model.inject``) and target (passed to ``model.loss``).
        method: one of the six above.
        beta: nudge strength (for ``holomorphic``: the radius r). Default per method.
        points: ``holomorphic``: number N of nudges β_k = r e^{2πik/N} (≥ 2).
        anchor: ``aep``/``holomorphic`` with correction: ``"fixed"`` or ``"tracking"``.
        correction: ``holomorphic``: apply the AEP correction (default True).
        steps: ``bptt``: exactly this many unrolled steps (default ``max_steps``).
        step_size: ε of z ← z + ε F(z) (also the Richardson step of the adjoint phases).
        tol: free phase: stop a sample when ‖F(z)‖/‖z‖ ≤ tol (0: exactly ``max_steps`` steps).
        tol_adjoint: adjoint/nudged phases: stop when ‖r_a‖/‖ℓ‖ ≤ tol_adjoint.
        max_steps, max_steps_adjoint: step caps (reaching one warns, ``converged=False``).
        check_every: the cap of the residual-check interval: with tol > 0 the residual is checked
            at steps 1, 2, 4, … below it and at every multiple of it (each check one host sync).
        anderson: Anderson memory for the free phase (0: off).
        adjoint_solver: ``implicit``: ``"richardson"`` or ``"gmres"``.
        gmres_restart: GMRES restart length.
        freeze: stop updating samples that converged.
        divergence_factor: a phase whose residual grows by this factor diverged.
        stall_checks: a phase stops (``converged=False``, warning) when its residual has not
            improved by 1% for this many checks — a tolerance below the rounding floor
            (0: never). Not used with ``tol = 0`` or by GMRES.
        noise: a noise realisation to use (default: ``model.sample_noise(x_in, generator)``).
        generator: passed to ``model.sample_noise``.
        z0: initial free state (default ``model.init_state``).
        nonfinite: what a diverged phase or a non-finite gradient/loss does (the library's one
            non-finite policy, :mod:`gradstats.errors`): ``"raise"`` (default) raises a
            :class:`~gradstats.errors.DivergenceError` naming the phase, step and samples;
            ``"skip"`` drops the whole estimate and returns one with ``skipped=True``, zero
            grads and the ``reason`` (callers count it: the trainer's ``skipped`` counter).
            Either way nothing non-finite reaches ``.grad``. Deciding it costs one host read
            of the gradients' finiteness per estimate (a documented sync point).
        on_failure: deprecated alias of ``nonfinite`` (same values; warns ``FutureWarning``).
        solver: the shared solver settings as one :class:`~gradstats.eqprop.SolverSettings`
            record (instead of, not as well as, the same keywords).
        options: the estimator's own settings as its options record
            (``get_estimator(method).options``), instead of the keywords.

    Defaults: explicit arguments > ``model.solver_defaults`` > library defaults
    (``gradstats.eqprop.LIBRARY_DEFAULTS``).

    Returns:
        A :class:`GradientEstimate` (``grads``, ``adjoint``, ``state``, ``loss``, ``stats``).

    Raises:
        ConfigurationError: unknown method, a method the model (or its mode) does not support,
            bad settings, or a setting that does not apply to ``method`` (a ``ValueError``;
            :class:`~gradstats.errors.ConfigurationTypeError` for a wrong type).
        DivergenceError: a phase diverged or the gradient is non-finite (``nonfinite="raise"``).
    """
    estimator = get_estimator(method)
    if on_failure is not None:
        check_nonfinite("on_failure", on_failure)
    policy = check_nonfinite(
        "nonfinite", deprecated_alias("on_failure", "nonfinite", on_failure, nonfinite, "raise")
    )
    check_method_supported(model, method)
    dtype = z0.dtype if isinstance(z0, torch.Tensor) else torch.get_default_dtype()
    keywords: dict[str, object] = dict(
        beta=beta,
        points=points,
        anchor=anchor,
        correction=correction,
        steps=steps,
        step_size=step_size,
        tol=tol,
        tol_adjoint=tol_adjoint,
        max_steps=max_steps,
        max_steps_adjoint=max_steps_adjoint,
        check_every=check_every,
        anderson=anderson,
        adjoint_solver=adjoint_solver,
        gmres_restart=gmres_restart,
        freeze=freeze,
        divergence_factor=divergence_factor,
        stall_checks=stall_checks,
    )
    explicit = _with_records(estimator, keywords, solver, options)
    resolve_settings(method, model.solver_defaults, dtype, **explicit)  # fail before any work
    problem = prepare(
        model, x, y, noise=noise, generator=generator, z0=z0, complex_check=method == "holomorphic"
    )
    s = resolve_settings(method, model.solver_defaults, problem.z0.dtype, **explicit)
    try:
        state, a, stats, grads, loss = estimator.compute(problem, s)
        if grads is None or loss is None:
            grads, loss = assemble(problem, state, a)
        if not _finite(grads) or not bool(torch.isfinite(loss)):  # sync-ok: once per estimate
            raise DivergenceError(
                f"method={method!r} produced non-finite gradients or loss",
                phase="gradient",
            )
    except DivergenceError as error:
        if policy == "raise":
            raise
        zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
        return GradientEstimate(
            method=method,
            grads=zeros,
            adjoint=None,
            state=None,
            loss=None,
            stats={},
            settings=s.as_dict(),
            noise=problem.noise,
            skipped=True,
            reason=str(error),
        )
    return GradientEstimate(
        method=method,
        grads=grads,
        adjoint=a,
        state=state,
        loss=loss,
        stats=stats,
        settings=s.as_dict(),
        noise=problem.noise,
    )
