"""The shared solver loop: per-sample residual stopping, freezing, divergence and stall checks.

:func:`iterate` runs a ``step`` that proposes the next state and, at check steps, the residual
of the *current* state. At each check the loop reads one small flag tensor from the device (all
converged? any diverged? stalled? any frozen?) — the only host syncs. With ``tol > 0`` the
checks come at steps 0, 1, 2, 4, 8, … (the powers of two below the cap ``check_every``) and at
every multiple of ``check_every``: a superset of the fixed schedule 0, c, 2c, …, so a phase never
stops later than it did with a fixed interval, and a phase that converges in k < c steps stops
at the first power of two ≥ k (a fixed interval of 10 ran a 2-step phase for 10 steps), for
log₂ c extra host reads per phase. With ``tol == 0`` (exactly ``max_steps`` steps) the fixed
schedule is used: no early stop is possible. Samples whose residual is at or
below ``tol`` are frozen (their state stops changing) when ``freeze`` is set. Divergence (a
non-finite residual, or an absolute residual grown past ``divergence_factor`` times its initial
value) raises :class:`~gradstats.errors.DivergenceError`; hitting ``max_steps`` warns
(``ConvergenceWarning``) unless ``tol == 0`` (which asks for exactly ``max_steps`` steps). A phase
whose residual has not improved by 1% for ``stall_checks`` consecutive checks in every unconverged
sample (a tolerance below the attainable rounding floor) stops early with ``converged=False`` and
warns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from gradstats._warnings import warn as _warn
from gradstats.eqprop._stats import ConvergenceWarning, DivergenceError, SolveStats

__all__ = ["Main", "StepFn", "flush_denormal", "iterate", "tiny"]

Main = tuple[torch.Tensor, ...]
StepFn = Callable[[Main, Any, bool], tuple[Main, Any, torch.Tensor | None, torch.Tensor | None]]


def _select(mask: torch.Tensor, new: Main, old: Main) -> Main:
    out = []
    for n, o in zip(new, old, strict=True):
        m = mask.reshape((-1,) + (1,) * (n.dim() - 1))
        out.append(torch.where(m, n, o))
    return tuple(out)


def tiny(t: torch.Tensor) -> float:
    """The smallest positive normal number of ``t``'s (real) dtype."""
    return torch.finfo(t.real.dtype if t.is_complex() else t.dtype).tiny


@contextmanager
def flush_denormal(enabled: bool = True) -> Iterator[bool]:
    """Flush denormal (subnormal) CPU floats to zero for the duration of the block.

    A backward through many relaxation steps (BPTT, or any autograd graph of a long free phase)
    drives the adjoint of early steps towards zero geometrically; on x86 CPUs arithmetic on
    the resulting subnormal floats (below ``torch.finfo(dtype).tiny``: 1.2e-38 in float32,
    2.2e-308 in float64) is 10-100x slower than on normal ones, which made BPTT 6-10x slower at
    T1 = 30. Flushing them to zero changes only values smaller than ``tiny`` (so gradients are
    identical to well below any tolerance; tested bitwise on the small models) and removes the
    slowdown. The previous setting is restored on exit; torch exposes no getter, so "previous"
    is tracked here (nested blocks restore correctly; outside any block denormals are kept, as
    torch's default). GPUs are unaffected.

    Yields:
        whether flushing is active (``False`` where the CPU does not support it, or with
        ``enabled=False``).
    """
    global _FLUSHING
    previous = _FLUSHING
    active = bool(torch.set_flush_denormal(enabled)) and enabled
    _FLUSHING = active
    try:
        yield active
    finally:
        torch.set_flush_denormal(previous)
        _FLUSHING = previous


_FLUSHING = False  # flush_denormal's view of torch's (write-only) flush-denormal setting


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
    growing: bool = True,
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
        check_every: the cap of the check interval (each check is one host sync).
        freeze: stop updating samples once converged.
        divergence_factor: abs residual bound, relative to the first check.
        stall_checks: stop when no unconverged sample improved by 1% for this many checks
            (0: never; ignored when ``tol == 0``).
        warn: warn when the cap is hit with unconverged samples (and ``tol > 0``).
        hint: appended to warning and error messages.
        growing: with ``tol > 0``, also check at the powers of two below ``check_every``
            (1, 2, 4, …); ``False``: only every ``check_every`` steps (0, c, 2c, …).

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
    early = growing and tol > 0  # also check at the powers of two below check_every
    while True:
        at_cap = t >= max_steps
        check = at_cap or t % check_every == 0 or (early and t < check_every and t & (t - 1) == 0)
        proposal, new_aux, rel, res_abs = step(main, aux, check)
        if check:
            if rel is None or res_abs is None:
                raise RuntimeError(f"{phase} phase: the step returned no residual at a check")
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
    assert final is not None  # step 0 is always a check
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
        _warn(
            f"{phase} phase: {missing} of {batch} samples did not reach tol={tol:g} {why} "
            f"(worst residual {worst:.3g}, {kind}); converged=False{hint}",
            ConvergenceWarning,
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
