"""``implicit``: the exact gradient at the free state, by an adjoint solve (the reference).

Free phase to ``tol``; ℓ = ∇_z L(z*); solve Jᵀλ = −ℓ to ``tol_adjoint`` with VJPs at z*
(Richardson λ ← λ + ε(Jᵀλ + ℓ), or GMRES); then g = λᵀ ∂F/∂θ + ∂L/∂θ. By the implicit function
theorem this is dL(z*(θ))/dθ exactly when both solves have converged.
"""

from __future__ import annotations

import torch

from gradstats.eqprop._autodiff import Linearization
from gradstats.eqprop._problem import Outcome, Problem, free_phase
from gradstats.eqprop._registry import T2_KEY, Estimator, Options
from gradstats.eqprop._settings import Settings
from gradstats.eqprop._solvers import solve_adjoint

__all__ = ["IMPLICIT", "implicit_adjoint"]


def implicit_adjoint(problem: Problem, s: Settings) -> Outcome:
    """Return ``(z*, λ, stats)`` (the gradient is assembled from λ)."""
    z, free = free_phase(problem, s)
    ell = problem.loss_grad(z)
    lin = Linearization(problem.force, z, problem.model.jvp_mode)
    with torch.no_grad():
        lam, adjoint = solve_adjoint(
            lin.vjp,
            ell,
            method=s.adjoint_solver,
            step_size=s.step_size,
            tol=s.tol_adjoint,
            max_steps=s.max_steps_adjoint,
            check_every=s.check_every,
            restart=s.gmres_restart,
            divergence_factor=s.divergence_factor,
            stall_checks=s.stall_checks,
        )
    return Outcome(z, lam, {"free": free, "adjoint": adjoint})


IMPLICIT = Estimator(
    name="implicit",
    estimate="λ solving Jᵀλ = −ℓ to tol_adjoint",
    exact_when="free and adjoint converged (the reference)",
    compute=implicit_adjoint,
    options=Options,  # no settings of its own: the adjoint solver's are shared
    phases=("free", "adjoint"),
    sweeps=("T2", "T1"),
    t2_keys=(T2_KEY,),
    train_rank=3,
)
