"""Iterative solvers with per-sample residual stopping and no per-step host sync.

* :func:`iterate`: the shared loop. A ``step`` proposes the next state and, at check steps,
  the residual of the *current* state. Every ``check_every`` steps the loop reads two flags from
  the device (all converged? any diverged?) — the only host syncs. Samples whose residual is at or
  below ``tol`` are frozen (their state stops changing) when ``freeze`` is set. Divergence (a
  non-finite residual, or an absolute residual grown past ``divergence_factor`` times its initial
  value) raises :class:`DivergenceError`; hitting ``max_steps`` warns (``ConvergenceWarning``)
  unless ``tol == 0`` (which asks for exactly ``max_steps`` steps). A phase whose residual has
  not improved by 1% for ``stall_checks`` consecutive checks in every unconverged sample (a
  tolerance below the attainable rounding floor) stops early with ``converged=False`` and warns.
* :func:`fixed_point`: damped fixed-point iteration z ← z + ε F(z), optionally with Anderson
  acceleration (type II, memory m, regularised least squares, batched per sample).
* :func:`solve_adjoint`: Jᵀλ = −ℓ by Richardson iteration λ ← λ + ε(Jᵀλ + ℓ) or by restarted
  GMRES (per-sample Krylov spaces, Givens rotations), using only VJPs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from gradstats.eqprop._autodiff import per_sample_norm
from gradstats.eqprop._stats import ConvergenceWarning, DivergenceError, SolveStats

__all__ = ["fixed_point", "iterate", "solve_adjoint"]

Main = tuple[torch.Tensor, ...]
StepFn = Callable[[Main, Any, bool], tuple[Main, Any, torch.Tensor | None, torch.Tensor | None]]


def _select(mask: torch.Tensor, new: Main, old: Main) -> Main:
    out = []
    for n, o in zip(new, old, strict=True):
        m = mask.reshape((-1,) + (1,) * (n.dim() - 1))
        out.append(torch.where(m, n, o))
    return tuple(out)


def _tiny(t: torch.Tensor) -> float:
    return torch.finfo(t.real.dtype if t.is_complex() else t.dtype).tiny


def iterate(
    step: StepFn,
    main: Main,
    aux: Any = None,
    *,
    phase: str,
    kind: str,
    tol: float,
    max_steps: int,
    check_every: int,
    freeze: bool = True,
    divergence_factor: float = 1e6,
    stall_checks: int = 20,
    warn: bool = True,
    hint: str = "",
) -> tuple[Main, Any, SolveStats]:
    """Run ``step`` until every sample's residual is ≤ ``tol`` or ``max_steps`` updates.

    Args:
        step: ``step(main, aux, check) -> (proposal, aux, rel, abs)``: the proposed next
            ``main`` (a tuple of ``[B, ...]`` tensors) and, when ``check``, the relative and
            absolute ``[B]`` residuals of the *current* ``main``.
        main: the state tensors (first dimension: batch); frozen samples keep theirs.
        aux: extra state handed back by ``step`` (e.g. Anderson history), never masked.
        phase, kind: labels stored in the :class:`SolveStats`.
        tol: per-sample tolerance on the relative residual (0: run exactly ``max_steps``).
        max_steps: the step cap.
        check_every: steps between residual checks (each check is one host sync).
        freeze: stop updating samples once converged.
        divergence_factor: abs residual bound, relative to the first check.
        stall_checks: stop when no unconverged sample improved by 1% for this many checks
            (0: never; ignored when ``tol == 0``).
        warn: warn when the cap is hit with unconverged samples (and ``tol > 0``).
        hint: appended to warning and error messages.

    Returns:
        ``(main, aux, stats)``.
    """
    batch = main[0].shape[0]
    device = main[0].device
    steps = torch.zeros(batch, dtype=torch.int64, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    trace: list[torch.Tensor] = []
    trace_steps: list[int] = []
    abs0: torch.Tensor | None = None
    final: torch.Tensor | None = None
    best = torch.full((batch,), torch.inf, device=device)
    since = torch.zeros(batch, dtype=torch.int64, device=device)
    stall_limit = stall_checks if stall_checks > 0 and tol > 0 else None
    stalled = False
    any_frozen = False  # host copy of "some sample is frozen", refreshed at every check
    t = 0
    while True:
        at_cap = t >= max_steps
        check = at_cap or t % check_every == 0
        proposal, new_aux, rel, res_abs = step(main, aux, check)
        if check:
            rel, res_abs = rel.detach(), res_abs.detach()
            trace.append(rel)
            trace_steps.append(t)
            final = rel if final is None else torch.where(active, rel, final)
            if abs0 is None:
                abs0 = res_abs
            # rel may be +inf legitimately (‖z‖ = 0 at a zero initial state); NaN never is.
            bad = torch.isnan(rel) | ~torch.isfinite(res_abs)
            bad |= (res_abs > divergence_factor * abs0) & (abs0 > 0)
            if freeze:
                active = active & ~(rel <= tol)
            improved = rel.to(best.dtype) < 0.99 * best
            best = torch.where(improved, rel.to(best.dtype), best)
            since = torch.where(improved, torch.zeros_like(since), since + 1)
            settled = (final <= tol) | (since >= (stall_limit or max_steps + 1))
            flags = torch.stack([(final <= tol).all(), bad.any(), settled.all(), ~active.all()])
            done, diverged, stalled, any_frozen = flags.tolist()  # sync-ok: one read per check
            if diverged:
                idx = torch.nonzero(bad).flatten()[:8].tolist()  # sync-ok: error path
                raise DivergenceError(
                    f"{phase} phase diverged at step {t}: the residual ({kind}) is non-finite or "
                    f"grew more than divergence_factor={divergence_factor:g} times its initial "
                    f"value for samples {idx}; reduce step_size or check the model{hint}",
                    phase=phase,
                    step=t,
                    samples=idx,
                )
            if done or at_cap or stalled:
                break
        if proposal is not None:
            main = _select(active, proposal, main) if freeze and any_frozen else proposal
        aux = new_aux
        steps += active.to(torch.int64) if freeze else 1
        t += 1
    converged = final <= tol
    if warn and tol > 0 and not done:
        worst = float(final.max())  # sync-ok: warning path, once per phase
        missing = int((~converged).sum())  # sync-ok
        why = (
            f"stalled (no 1% improvement in {stall_checks} checks) at step {t}: tol is "
            "probably below the attainable rounding floor"
            if stalled and not at_cap
            else f"within max_steps={max_steps}"
        )
        warnings.warn(
            f"{phase} phase: {missing} of {batch} samples did not reach tol={tol:g} {why} "
            f"(worst residual {worst:.3g}, {kind}); converged=False{hint}",
            ConvergenceWarning,
            stacklevel=3,
        )
    stats = SolveStats(
        phase=phase,
        kind=kind,
        steps=steps,
        converged=converged,
        final_residual=final,
        trace=torch.stack(trace),
        trace_steps=tuple(trace_steps),
        tol=tol,
        max_steps=max_steps,
        diverged=torch.zeros(batch, dtype=torch.bool, device=device),
        extra={"stalled": (since >= stall_limit) & ~converged} if stall_limit else {},
    )
    return main, aux, stats


def _free_residual(z: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    res_abs = per_sample_norm(f)
    return res_abs / per_sample_norm(z).clamp_min(_tiny(z)), res_abs


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
    z_{k+1} = z_k + r_k − Σ_i γ_i [(z_k − z_i) + (r_k − r_i)].

    Returns:
        ``(z, stats)``; ``z`` is the last state (per sample: the state whose residual met
        ``tol`` when it froze).
    """
    eps = step_size

    def plain(main, aux, check):
        (z,) = main
        f = fn(z)
        rel, res_abs = _free_residual(z, f) if check else (None, None)
        return (z + eps * f,), aux, rel, res_abs

    def accelerated(main, aux, check):
        (z,) = main
        hist_z, hist_r = aux
        f = fn(z)
        r = eps * f
        rel, res_abs = _free_residual(z, f) if check else (None, None)
        if hist_z:
            batch = z.shape[0]
            flat_z, flat_r = z.reshape(batch, -1), r.reshape(batch, -1)
            d_z = flat_z.unsqueeze(1) - torch.stack(hist_z, 1)  # [B, n, D]
            d_r = flat_r.unsqueeze(1) - torch.stack(hist_r, 1)
            gram = d_r.conj() @ d_r.transpose(1, 2)  # [B, n, n]
            n = gram.shape[-1]
            scale = torch.diagonal(gram, dim1=1, dim2=2).real.mean(-1)
            ridge = scale * torch.finfo(scale.dtype).eps ** 0.5 + _tiny(scale)
            eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
            rhs = (d_r.conj() @ flat_r.unsqueeze(-1)).squeeze(-1)
            gamma = torch.linalg.solve(gram + ridge[:, None, None] * eye, rhs)
            mixed = flat_z + flat_r - (gamma.unsqueeze(1) @ (d_z + d_r)).squeeze(1)
            proposal = mixed.reshape(z.shape)
        else:
            proposal = z + r
        new_aux = (
            (*hist_z, z.reshape(z.shape[0], -1))[-anderson:],
            (*hist_r, r.reshape(z.shape[0], -1))[-anderson:],
        )
        return (proposal,), new_aux, rel, res_abs

    step, aux = (accelerated, ((), ())) if anderson > 0 else (plain, None)
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
    ell_norm = per_sample_norm(ell).clamp_min(_tiny(ell))

    def step(main, aux, check):
        (lam,) = main
        r = vjp(lam) + ell
        if check:
            res_abs = per_sample_norm(r)
            rel = res_abs / ell_norm
        else:
            rel = res_abs = None
        return (lam + step_size * r,), aux, rel, res_abs

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
    tiny = _tiny(rhs)
    rhs_norm = rhs.norm(dim=1).clamp_min(tiny)

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
        basis = [resid / res_abs.clamp_min(tiny)[:, None]]
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
            basis.append(w / h_next.clamp_min(tiny)[:, None])
            for i in range(j):  # previous Givens rotations on column j
                a, b = hess[:, i, j].clone(), hess[:, i + 1, j].clone()
                hess[:, i, j] = cs[:, i] * a + sn[:, i] * b
                hess[:, i + 1, j] = -sn[:, i] * a + cs[:, i] * b
            a, b = hess[:, j, j].clone(), hess[:, j + 1, j].clone()
            radius = torch.sqrt(a * a + b * b)
            safe = radius.clamp_min(tiny)
            cs[:, j] = torch.where(radius > 0, a / safe, torch.ones_like(a))
            sn[:, j] = torch.where(radius > 0, b / safe, torch.zeros_like(b))
            hess[:, j, j] = radius
            hess[:, j + 1, j] = 0
            g[:, j + 1] = -sn[:, j] * g[:, j]
            g[:, j] = cs[:, j] * g[:, j]
        upper = hess[:, :m, :m]
        diag = torch.diagonal(upper, dim1=1, dim2=2)
        ok = diag.abs() > tiny**0.5
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
        warnings.warn(
            f"adjoint phase (GMRES): {missing} of {batch} samples did not reach "
            f"tol_adjoint={tol:g} within max_steps_adjoint={max_steps} "
            f"(worst residual {worst:.3g}); converged=False",
            ConvergenceWarning,
            stacklevel=3,
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
    """
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
    if method == "gmres":
        if ell.is_complex():
            raise ValueError("adjoint solves are real; got a complex ℓ")
        return _gmres(
            vjp,
            ell,
            lam0,
            tol=tol,
            max_steps=max_steps,
            restart=restart,
            divergence_factor=divergence_factor,
        )
    raise ValueError(f"method must be 'richardson' or 'gmres'; got {method!r}")
