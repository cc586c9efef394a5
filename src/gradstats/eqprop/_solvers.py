"""Iterative solvers with per-sample residual stopping and no per-step host sync.

Both run on :func:`~gradstats.eqprop._iterate.iterate` (per-sample stopping, freezing,
divergence and stall checks; one host read per check):

* :func:`fixed_point`: damped fixed-point iteration z ← z + ε F(z), optionally with Anderson
  acceleration (type II, memory m, regularised least squares, batched per sample).
* :func:`solve_adjoint`: Jᵀλ = −ℓ by Richardson iteration λ ← λ + ε(Jᵀλ + ℓ) or by restarted
  GMRES (per-sample Krylov spaces, Givens rotations), using only VJPs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradstats._validation import check_choice, check_positive_int
from gradstats._warnings import warn
from gradstats.eqprop._autodiff import per_sample_norm
from gradstats.eqprop._iterate import iterate, tiny
from gradstats.eqprop._settings import check_float
from gradstats.eqprop._stats import ConvergenceWarning, DivergenceError, SolveStats
from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = ["fixed_point", "iterate", "solve_adjoint"]


def _free_residual(z: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    res_abs = per_sample_norm(f)
    return res_abs / per_sample_norm(z).clamp_min(tiny(z)), res_abs


def fixed_point(
    fn: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    step_size: float,
    tol: float,
    max_steps: int,
    check_every: int = 10,
    anderson: int = 0,
    freeze: bool = True,
    divergence_factor: float = 1e6,
    stall_checks: int = 20,
    phase: str = "free",
    warn: bool = True,
) -> tuple[torch.Tensor, SolveStats]:
    """Relax z ← z + ε F(z) to F(z) = 0; residual ‖F(z)‖/‖z‖ per sample.

    With ``anderson = m > 0``, Anderson acceleration (type II) replaces the plain step: with
    residuals r_i = εF(z_i) of the last m iterates, γ = argmin ‖r_k − Σ_i γ_i (r_k − r_i)‖
    (ridge-regularised normal equations, per sample) and
    z_{k+1} = z_k + r_k − Σ_i γ_i [(z_k − z_i) + (r_k − r_i)]. The history lives in two
    preallocated ring buffers ``[B, m, D]`` (one slot written per step; γ does not depend on
    the order of the history, so nothing is restacked).

    Returns:
        ``(z, stats)``; ``z`` is the last state (per sample: the state whose residual met
        ``tol`` when it froze).

    Raises:
        ConfigurationError: a bad option (the message names it and the valid values).
        DivergenceError: the residual became non-finite or grew past ``divergence_factor``.
    """
    if not callable(fn):
        raise ConfigurationTypeError(f"fn must be callable; got {type(fn).__name__}")
    if not isinstance(z0, torch.Tensor) or z0.dim() < 1:
        what = f"shape {tuple(z0.shape)}" if isinstance(z0, torch.Tensor) else type(z0).__name__
        raise ConfigurationTypeError(f"z0 must be a [B, ...] torch.Tensor; got {what}")
    _check_solver_options(
        step_size=step_size,
        tol=tol,
        max_steps=max_steps,
        check_every=check_every,
        divergence_factor=divergence_factor,
        stall_checks=stall_checks,
    )
    check_positive_int("anderson", anderson, minimum=0)
    if not isinstance(freeze, bool):
        raise ConfigurationTypeError(f"freeze must be a bool; got {type(freeze).__name__}")
    eps = step_size

    def plain(main, aux, check):
        (z,) = main
        f = fn(z)
        rel, res_abs = _free_residual(z, f) if check else (None, None)
        return (z + eps * f,), aux, rel, res_abs

    def accelerated(main, aux, check):
        (z,) = main
        hist_z, hist_r, count = aux  # ring buffers [B, m, D]: slot k % m holds iterate k
        f = fn(z)
        r = eps * f
        rel, res_abs = _free_residual(z, f) if check else (None, None)
        batch = z.shape[0]
        flat_z, flat_r = z.reshape(batch, -1), r.reshape(batch, -1)
        n = min(count, anderson)
        if n:  # the least squares is invariant to the order of the history: no restacking
            d_z = flat_z.unsqueeze(1) - hist_z[:, :n]  # [B, n, D]
            d_r = flat_r.unsqueeze(1) - hist_r[:, :n]
            gram = d_r.conj() @ d_r.transpose(1, 2)  # [B, n, n]
            scale = torch.diagonal(gram, dim1=1, dim2=2).real.mean(-1)
            ridge = scale * torch.finfo(scale.dtype).eps ** 0.5 + tiny(scale)
            eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
            rhs = (d_r.conj() @ flat_r.unsqueeze(-1)).squeeze(-1)
            gamma = torch.linalg.solve(gram + ridge[:, None, None] * eye, rhs)
            mixed = flat_z + flat_r - (gamma.unsqueeze(1) @ (d_z + d_r)).squeeze(1)
            proposal = mixed.reshape(z.shape)
        else:
            proposal = z + r
            shape = (batch, anderson, flat_z.shape[1])
            hist_z = flat_z.new_zeros(shape)
            hist_r = flat_r.new_zeros(shape)
        slot = count % anderson
        hist_z[:, slot] = flat_z
        hist_r[:, slot] = flat_r
        return (proposal,), (hist_z, hist_r, count + 1), rel, res_abs

    step, aux = (accelerated, (None, None, 0)) if anderson > 0 else (plain, None)
    (z,), _, stats = iterate(
        step,
        (z0,),
        aux,
        phase=phase,
        kind="free",
        tol=tol,
        max_steps=max_steps,
        check_every=check_every,
        freeze=freeze,
        divergence_factor=divergence_factor,
        stall_checks=stall_checks,
        warn=warn,
    )
    return z, stats


def _richardson(
    vjp, ell, lam0, *, step_size, tol, max_steps, check_every, divergence_factor, stall_checks
):
    ell_norm = per_sample_norm(ell).clamp_min(tiny(ell))

    def step(main, aux, check):
        (lam,) = main
        r = vjp(lam) + ell
        if not check:
            return (lam + step_size * r,), aux, None, None
        res_abs = per_sample_norm(r)
        return (lam + step_size * r,), aux, res_abs / ell_norm, res_abs

    (lam,), _, stats = iterate(
        step,
        (lam0,),
        phase="adjoint",
        kind="adjoint",
        tol=tol,
        max_steps=max_steps,
        check_every=check_every,
        divergence_factor=divergence_factor,
        stall_checks=stall_checks,
    )
    return lam, stats


def _gmres(vjp, ell, lam0, *, tol, max_steps, restart, divergence_factor):
    """Restarted GMRES(m) for Jᵀλ = −ℓ, one Krylov space per sample (batched)."""
    shape, batch = ell.shape, ell.shape[0]
    rhs = -ell.reshape(batch, -1)
    floor = tiny(rhs)
    rhs_norm = rhs.norm(dim=1).clamp_min(floor)

    def apply(v):
        return vjp(v.reshape(shape)).reshape(batch, -1)

    lam = lam0.reshape(batch, -1)
    steps = torch.zeros(batch, dtype=torch.int64, device=rhs.device)
    trace, trace_steps = [], []
    used = 0
    abs0 = None
    while True:
        resid = rhs - apply(lam)
        used += 1
        res_abs = resid.norm(dim=1)
        rel = res_abs / rhs_norm
        trace.append(rel)
        trace_steps.append(used)
        abs0 = res_abs if abs0 is None else abs0
        active = rel > tol
        bad = ~torch.isfinite(rel) | ((res_abs > divergence_factor * abs0) & (abs0 > 0))
        done, diverged = torch.stack([~active.any(), bad.any()]).tolist()  # sync-ok: per cycle
        if diverged:
            raise DivergenceError(
                "adjoint phase (GMRES) produced a non-finite residual; check the model",
                phase="adjoint",
                step=used,
                samples=torch.nonzero(bad).flatten()[:8].tolist(),  # sync-ok: error path
            )
        if done or used >= max_steps:
            break
        m = min(restart, max_steps - used)
        basis = [resid / res_abs.clamp_min(floor)[:, None]]
        hess = torch.zeros(batch, m + 1, m, dtype=rhs.dtype, device=rhs.device)
        cs = torch.zeros(batch, m, dtype=rhs.dtype, device=rhs.device)
        sn = torch.zeros_like(cs)
        g = torch.zeros(batch, m + 1, dtype=rhs.dtype, device=rhs.device)
        g[:, 0] = res_abs
        for j in range(m):
            w = apply(basis[j])
            for i in range(j + 1):  # modified Gram-Schmidt, per sample
                h = (basis[i] * w).sum(1)
                hess[:, i, j] = h
                w = w - h[:, None] * basis[i]
            h_next = w.norm(dim=1)
            hess[:, j + 1, j] = h_next
            basis.append(w / h_next.clamp_min(floor)[:, None])
            for i in range(j):  # previous Givens rotations on column j
                a, b = hess[:, i, j].clone(), hess[:, i + 1, j].clone()
                hess[:, i, j] = cs[:, i] * a + sn[:, i] * b
                hess[:, i + 1, j] = -sn[:, i] * a + cs[:, i] * b
            a, b = hess[:, j, j].clone(), hess[:, j + 1, j].clone()
            radius = torch.sqrt(a * a + b * b)
            safe = radius.clamp_min(floor)
            cs[:, j] = torch.where(radius > 0, a / safe, torch.ones_like(a))
            sn[:, j] = torch.where(radius > 0, b / safe, torch.zeros_like(b))
            hess[:, j, j] = radius
            hess[:, j + 1, j] = 0
            g[:, j + 1] = -sn[:, j] * g[:, j]
            g[:, j] = cs[:, j] * g[:, j]
        upper = hess[:, :m, :m]
        diag = torch.diagonal(upper, dim1=1, dim2=2)
        ok = diag.abs() > floor**0.5
        upper = upper + torch.diag_embed(torch.where(ok, torch.zeros_like(diag), 1.0))
        y = torch.linalg.solve_triangular(upper, (g[:, :m] * ok).unsqueeze(-1), upper=True)
        update = (torch.stack(basis[:m], 2) @ y).squeeze(-1)
        lam = lam + active[:, None] * update
        steps += m * active.to(torch.int64)
        used += m
    final = trace[-1]
    converged = final <= tol
    if tol > 0 and not done:
        missing, worst = int((~converged).sum()), float(final.max())  # sync-ok: warning path
        warn(
            f"adjoint phase (GMRES): {missing} of {batch} samples did not reach "
            f"tol_adjoint={tol:g} within max_steps_adjoint={max_steps} "
            f"(worst residual {worst:.3g}); converged=False",
            ConvergenceWarning,
        )
    stats = SolveStats(
        phase="adjoint",
        kind="adjoint",
        steps=steps,
        converged=converged,
        final_residual=final,
        trace=torch.stack(trace),
        trace_steps=tuple(trace_steps),
        tol=tol,
        max_steps=max_steps,
        diverged=torch.zeros(batch, dtype=torch.bool, device=rhs.device),
    )
    return lam.reshape(shape), stats


def solve_adjoint(
    vjp: Callable[[torch.Tensor], torch.Tensor],
    ell: torch.Tensor,
    *,
    method: str = "richardson",
    step_size: float = 0.5,
    tol: float = 1e-8,
    max_steps: int = 1000,
    check_every: int = 10,
    restart: int = 20,
    lam0: torch.Tensor | None = None,
    divergence_factor: float = 1e6,
    stall_checks: int = 20,
) -> tuple[torch.Tensor, SolveStats]:
    """Solve Jᵀλ = −ℓ per sample with VJPs only; residual ‖Jᵀλ + ℓ‖/‖ℓ‖.

    Args:
        vjp: u ↦ Jᵀu (e.g. :meth:`Linearization.vjp` at the free state).
        ell: ℓ = ∇_z L at the free state.
        method: ``"richardson"`` (λ ← λ + ε(Jᵀλ + ℓ), converges when the free relaxation does)
            or ``"gmres"`` (restarted GMRES(``restart``); each VJP counts as a step).
        lam0: initial guess (zeros by default).

    Raises:
        ConfigurationError: a bad option (the message names it and the valid values), or a
            complex ``ell`` with ``method="gmres"``.
        DivergenceError: the residual became non-finite or grew past ``divergence_factor``.
    """
    check_choice("method", method, ("richardson", "gmres"))
    if not isinstance(ell, torch.Tensor):
        raise ConfigurationTypeError(f"ell must be a torch.Tensor; got {type(ell).__name__}")
    _check_solver_options(
        step_size=step_size,
        tol=tol,
        max_steps=max_steps,
        check_every=check_every,
        divergence_factor=divergence_factor,
        stall_checks=stall_checks,
    )
    check_positive_int("restart", restart)
    if lam0 is not None and (not isinstance(lam0, torch.Tensor) or lam0.shape != ell.shape):
        shape = tuple(lam0.shape) if isinstance(lam0, torch.Tensor) else type(lam0).__name__
        raise ConfigurationError(
            f"lam0 must be a tensor shaped like ell {tuple(ell.shape)}; got {shape}"
        )
    lam0 = torch.zeros_like(ell) if lam0 is None else lam0
    if method == "richardson":
        return _richardson(
            vjp,
            ell,
            lam0,
            step_size=step_size,
            tol=tol,
            max_steps=max_steps,
            check_every=check_every,
            divergence_factor=divergence_factor,
            stall_checks=stall_checks,
        )
    if ell.is_complex():
        raise ConfigurationError("method='gmres' solves real adjoints only; got a complex ell")
    return _gmres(
        vjp,
        ell,
        lam0,
        tol=tol,
        max_steps=max_steps,
        restart=restart,
        divergence_factor=divergence_factor,
    )


def _check_solver_options(
    *,
    step_size: object,
    tol: object,
    max_steps: object,
    check_every: object,
    divergence_factor: object,
    stall_checks: object,
) -> None:
    """Validate the options :func:`fixed_point` and :func:`solve_adjoint` share."""
    check_float("step_size", step_size)
    check_float("tol", tol, allow_zero=True)
    check_positive_int("max_steps", max_steps)
    check_positive_int("check_every", check_every)
    check_positive_int("stall_checks", stall_checks, minimum=0)
    if check_float("divergence_factor", divergence_factor) <= 1:
        raise ConfigurationError(f"divergence_factor must be > 1; got {divergence_factor!r}")
