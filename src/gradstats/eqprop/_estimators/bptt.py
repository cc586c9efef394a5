"""``bptt``: autograd through exactly ``steps`` unrolled relaxation steps (the finite-T objective).

z₀ = init_state(x_in), z_{t+1} = z_t + ε F(z_t), g = dL(z_T)/dθ by backpropagation through all T
steps (memory linear in T). No early stopping and no freezing: it defines the objective of a
model evaluated with exactly T steps. The residual is recorded (and checked for divergence) on
the free solver's schedule — steps 0, 1, 2, 4, … below ``check_every`` and every multiple of it —
so the trace resolves a fast contraction as the free phase's does (the trainer's contraction
controller reads it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch

from gradstats._validation import check_positive_int
from gradstats.eqprop._autodiff import per_sample_norm
from gradstats.eqprop._module import trainable
from gradstats.eqprop._problem import Outcome, Problem, free_residual
from gradstats.eqprop._registry import T1_KEY, Estimator, Options
from gradstats.eqprop._settings import Settings, required
from gradstats.eqprop._stats import DivergenceError, SolveStats

__all__ = ["BPTT", "BPTTOptions", "bptt_gradients"]


@dataclass(frozen=True)
class BPTTOptions(Options):
    """Settings of BPTT: exactly ``steps`` unrolled steps (default: ``max_steps``)."""

    DEFAULTS: ClassVar[Mapping[str, object]] = MappingProxyType({"steps": None})
    steps: int | None = None

    @classmethod
    def resolve(
        cls, method: str, merged: Mapping[str, object], given: Mapping[str, object], max_steps: int
    ) -> BPTTOptions:
        steps = merged.get("steps")
        return cls(steps=max_steps if steps is None else check_positive_int("steps", steps))


def bptt_gradients(problem: Problem, s: Settings) -> Outcome:
    """Return ``(z_T, None, stats, grads, loss)`` (no adjoint: autograd gives the grads)."""
    model = problem.model
    names, params = trainable(model)
    options = s.options
    assert isinstance(options, BPTTOptions)
    steps = required(options.steps, "steps", s.method)
    trace: list[torch.Tensor] = []
    trace_steps: list[int] = []
    with torch.enable_grad():
        x_in = model.inject(problem.x)
        z = problem.z0 if problem.z0_given else model.init_state(x_in)
        abs0 = None
        for t in range(steps):
            f = problem.force_with_input(z, x_in)
            if t % s.check_every == 0 or (t < s.check_every and t & (t - 1) == 0):
                res_abs = per_sample_norm(f.detach())
                trace.append(res_abs / per_sample_norm(z.detach()).clamp_min(1e-30))
                trace_steps.append(t)
                abs0 = res_abs if abs0 is None else abs0
                bad = ~torch.isfinite(res_abs) | (res_abs > s.divergence_factor * abs0)
                if bool(bad.any()):  # sync-ok: one read per check, as in the other phases
                    raise DivergenceError(
                        f"bptt unroll diverged at step {t} (non-finite or growing residual); "
                        "reduce step_size",
                        phase="bptt",
                        step=t,
                        samples=torch.nonzero(bad).flatten()[:8].tolist(),  # sync-ok
                    )
            z = z + s.step_size * f
        loss = model.loss(z, problem.target)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    z = z.detach()
    final = free_residual(problem, z)
    trace.append(final)
    trace_steps.append(steps)
    batch = z.shape[0]
    stats = SolveStats(
        phase="bptt",
        kind="free",
        steps=torch.full((batch,), steps, dtype=torch.int64, device=z.device),
        converged=final <= s.tol,
        final_residual=final,
        trace=torch.stack(trace),
        trace_steps=tuple(trace_steps),
        tol=s.tol,
        max_steps=steps,
        diverged=torch.zeros(batch, dtype=torch.bool, device=z.device),
    )
    out = {
        n: torch.zeros_like(p) if g is None else g
        for n, p, g in zip(names, params, grads, strict=True)
    }
    return Outcome(z, None, {"bptt": stats}, out, loss.detach())


BPTT = Estimator(
    name="bptt",
    estimate="autograd through exactly steps steps",
    exact_when="defines the finite-T objective",
    compute=bptt_gradients,
    options=BPTTOptions,
    phases=("bptt",),
    sweeps=("T1",),
    t1_keys=(T1_KEY, "steps"),
    train_rank=4,
)
