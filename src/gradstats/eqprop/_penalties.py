"""Stabilising penalties on the *active* force, scaled from the pure task gradient.

Each penalty is evaluated with ``model.force`` — whatever dynamics the model currently runs —
at the estimate's own state, with the estimate's own input injection and noise realisation:

* ``residual``: ½ mean_b max(0, ‖F(z_b)‖² − tol²‖z_b‖²) (free-residual penalty: only what a
  sample's residual exceeds the solver tolerance ‖F‖/‖z‖ ≤ tol; ``tol = 0`` is ½ mean_b ‖F(z_b)‖²);
* ``jacobian``: ½ mean_b E_v ‖J_b v‖² = ½ mean_b ‖J_b‖²_F (Hutchinson, v ~ N(0, I)); with
  ``norm="spectral"`` instead ½ mean_b ‖J_b v̂_b‖² ≈ ½ mean_b σ_max(J_b)², v̂_b the unit vector
  after ``iterations`` power-iteration steps v ← JᵀJv/‖JᵀJv‖ from a random start (detached: by
  the envelope theorem ∇σ_max² = ∇‖J v̂‖² at the top right-singular vector v̂); with a
  ``bound`` s > 0 only the excess, ½ mean_b max(0, ‖J_b v̂_b‖² − s²) (a Lipschitz bound: zero for
  a sample whose map already contracts at rate ≤ s, whatever its other singular values); with
  ``norm="loop"`` ½ mean_b E_v ‖J_b² v‖² = ½ mean_b ‖J_b²‖²_F, the Frobenius norm of the square
  of the Jacobian at z (inside ``model.relaxation_map``, (I + εJ)²: at a fixed point the Jacobian
  of two map steps Φ∘Φ) — ρ(J)² ≤ ‖J²‖_F, so it bounds the contraction rate. For a layered block
  (feed-forward coupled sub-states) at the default step ε = 1/(1 + c) the map's Jacobian is
  block off-diagonal, [[0, γA′], [B′, 0]] with A′ = ε∂Attn and B′ = ε(I + ∂FFN), so its square
  is γ·diag(A′B′, B′A′): the loop gain around the feedback, through both sub-layers, and exactly
  zero without feedback (another ``step_size`` adds diagonal blocks and loses this);
* ``asymmetry``: ½ mean_b E_v ‖(J_b − J_bᵀ)v‖² = ½ mean_b ‖J_b − J_bᵀ‖²_F (Jacobian homeostasis,
  Laborieux & Zenke 2024).

With ``relative=True`` a penalty of weight w is scaled to s = w·‖g_task‖/‖g_pen‖ (global norms),
where g_task is the *pure* task gradient (``estimate.task_grads`` if penalties were already
added) — never a total that already contains other penalties; a penalty whose gradient is exactly
zero gets s = 0. Only the penalty's direction survives this scaling: a hinge (the residual
penalty, a bounded spectral penalty) acts as a switch — zero while satisfied, the full push
w·‖g_task‖ as soon as any sample exceeds it, however slightly.

Why the residual penalty is a hinge at the tolerance. At a state the solver converged,
½‖F(z)‖² is the square of the residual it stopped at (10⁻¹²–10⁻⁸ in the README's 2,000-step
runs). Its gradient points towards a map whose slowest modes contract faster: at the float32
and the float64 fixed point of the same trained weights the two directions have cosine 0.70,
so it is not rounding. Its size vanishes with the tolerance, but relative scaling multiplied it
by 10⁷–10¹⁰ up to the task gradient's norm. The result was a second contraction penalty as
strong as the task on every step, however well the map converged. Penalising only the excess
over the tolerance keeps what the penalty is for (samples the solver left unconverged) and gives
exactly nothing at a converged state. :func:`add_penalties` takes the tolerance of the
estimate's own free phase by default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from gradstats._validation import check_choice, check_positive_int
from gradstats.eqprop._autodiff import Linearization
from gradstats.eqprop._module import EquilibriumModule, NoiseRealization, trainable
from gradstats.eqprop._settings import check_float
from gradstats.eqprop._stats import GradientEstimate
from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = [
    "JACOBIAN_NORMS", "PENALTIES", "POWER_ITERATIONS", "add_penalties", "free_tolerance",
    "global_norm", "penalty_value", "relative_scale",
]  # fmt: skip

PENALTIES = ("residual", "jacobian", "asymmetry")
#: Norms of the ``jacobian`` penalty: all singular values of J (Frobenius), its largest one
#: (spectral), or all singular values of the two-step Jacobian J² (loop).
JACOBIAN_NORMS = ("frobenius", "spectral", "loop")
#: Default power-iteration steps of the spectral norm.
POWER_ITERATIONS = 3


def _check_shard(shard: object) -> tuple[int, int]:
    if isinstance(shard, tuple) and len(shard) == 2:
        rank, world = shard
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (rank, world)):
            return rank, world
    raise ConfigurationTypeError(f"shard must be a tuple (rank, world) of ints; got {shard!r}")


def penalty_value(
    model: EquilibriumModule,
    x: torch.Tensor,
    z: torch.Tensor,
    kind: str,
    *,
    noise: NoiseRealization | None = None,
    probes: int = 1,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] | None = None,
    tol: float = 0.0,
    norm: str = "frobenius",
    iterations: int = POWER_ITERATIONS,
    bound: float = 0.0,
) -> torch.Tensor:
    """The penalty ``kind`` at state ``z`` (differentiable w.r.t. the model's parameters).

    ``tol`` (``residual`` only): a sample whose relative residual ‖F(z_b)‖/‖z_b‖ is at most
    ``tol`` contributes nothing (see the module docstring); 0 gives ½ mean_b ‖F(z_b)‖².

    ``norm`` (``jacobian`` only): ``"frobenius"`` (Hutchinson), ``"loop"`` (Hutchinson on J²: each
    probe costs two Jv) or ``"spectral"`` — each of the
    ``probes`` vectors then runs ``iterations`` power-iteration steps per sample (0: a random
    unit direction, ½ mean_b ‖J_b‖²_F/n in expectation) and the value is the mean over probes
    of ½ mean_b ‖J_b v̂_b‖², a lower bound of ½ mean_b σ_max(J_b)² that is tight as the
    iteration converges. Each step costs one Jv and one Jᵀu. The value's error is second order
    in the angle between v̂ and the top singular vector, the gradient's first order: on a small
    transformer K = 3 steps gave 0.994 of σ_max² and a gradient 5.7% off (cosine 0.998), K = 300
    agreed to 10⁻¹⁵. ``bound`` (spectral only): a sample contributes only
    ½ max(0, ‖J_b v̂_b‖² − ``bound``²); since v̂ underestimates σ_max, a sample just above the
    bound may go unpenalised.

    ``shard=(rank, world)``: ``z`` holds rows ``rank·B:(rank+1)·B`` of a global batch of
    ``world·B`` rows; each Hutchinson vector is drawn for the global batch and sliced to these
    rows, so the W ranks together use — and advance ``generator`` by — exactly the draws of one
    process on the global batch.
    """
    check_choice("kind", kind, PENALTIES)
    check_positive_int("probes", probes)
    check_float("tol", tol, allow_zero=True)
    check_choice("norm", norm, JACOBIAN_NORMS)
    check_positive_int("iterations", iterations, minimum=0)
    check_float("bound", bound, allow_zero=True)
    if norm != "frobenius" and kind != "jacobian":
        raise ConfigurationError(f"norm={norm!r} applies to kind='jacobian'; got kind={kind!r}")
    if norm != "spectral" and (bound > 0 or iterations != POWER_ITERATIONS):
        detail = f"bound={bound}" if bound > 0 else f"iterations={iterations}"
        raise ConfigurationError(f"{detail} applies to norm='spectral'; got norm={norm!r}")
    if norm != "frobenius" and z.is_complex():
        raise ConfigurationError(f"norm={norm!r} needs a real state z; got a complex one")
    rank, world = (0, 1) if shard is None else _check_shard(shard)
    if not 0 <= rank < world:
        raise ConfigurationError(
            f"shard must be (rank, world) with 0 <= rank < world; got {shard!r}"
        )
    z = z.detach()
    with torch.enable_grad(), model.higher_order():  # exact third derivatives (see the hook)
        x_in = model.inject(x)

        def force(state):
            if noise is None:
                return model.force(state, x_in)
            return model.force(state, x_in, noise=noise)

        batch = z.shape[0]
        if kind == "residual":
            f = force(z)
            excess = (f * f).reshape(batch, -1).sum(1)
            if tol > 0:  # z is detached: the floor tol²‖z_b‖² is a constant
                excess = (excess - tol**2 * (z * z).reshape(batch, -1).sum(1)).clamp_min(0)
            return 0.5 * excess.sum() / batch
        lin = Linearization(force, z, model.jvp_mode, create_graph=True)
        total = z.new_zeros(())
        shape = (batch * world, *z.shape[1:])
        for _ in range(probes):
            v = torch.randn(shape, generator=generator, dtype=z.dtype, device=z.device)
            v = v[rank * batch : (rank + 1) * batch]
            if norm == "spectral":
                v = _power_iteration(lin, v, iterations)
            w = lin.jvp(v) if kind == "jacobian" else lin.antisymmetric(v)
            if norm == "loop":
                w = lin.jvp(w)  # J(Jv), differentiable through both products
            if bound > 0:
                total = total + ((w * w).reshape(batch, -1).sum(1) - bound**2).clamp_min(0).sum()
            else:
                total = total + (w * w).sum()
        return 0.5 * total / (batch * probes)


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    """Each sample's vector v_b scaled to ‖v_b‖ = 1 (a zero vector stays zero)."""
    norms = v.reshape(v.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    return v / norms.reshape(-1, *([1] * (v.dim() - 1)))


def _power_iteration(lin: Linearization, v: torch.Tensor, iterations: int) -> torch.Tensor:
    """v̂_b after ``iterations`` steps v ← JᵀJv/‖JᵀJv‖ per sample (J block-diagonal over the
    batch: the force acts on each sample alone), detached."""
    v = _unit_rows(v.detach())
    with lin.detached():
        for _ in range(iterations):
            v = _unit_rows(lin.vjp(lin.jvp(v)).detach())
    return v


def free_tolerance(estimate: GradientEstimate) -> float:
    """The tolerance of ``estimate``'s free phase (``bptt``: the one its residual records use;
    0 when it has neither): where its residual penalty starts (:func:`penalty_value`)."""
    stats = estimate.stats.get("free", estimate.stats.get("bptt"))
    return 0.0 if stats is None else float(stats.tol)


def relative_scale(weight: float, task_norm: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """s = w·‖g_task‖/‖g_pen‖, and 0 where ‖g_pen‖ = 0 (a satisfied penalty; no host sync)."""
    ratio = weight * task_norm / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    return torch.where(norm > 0, ratio, torch.zeros_like(ratio))


def global_norm(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(Σ_n ‖g_n‖²)^½ over a mapping of gradients (a 0-dim tensor)."""
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))


def add_penalties(
    estimate: GradientEstimate,
    model: EquilibriumModule,
    x: torch.Tensor,
    weights: Mapping[str, float],
    *,
    relative: bool = True,
    probes: int = 1,
    generator: torch.Generator | None = None,
    tol: float | None = None,
    jac_norm: str = "frobenius",
    iterations: int = POWER_ITERATIONS,
    jac_bound: float = 0.0,
) -> GradientEstimate:
    """A copy of ``estimate`` whose ``grads`` include the weighted penalties.

    Args:
        estimate: from ``estimate_gradient(model, x, ...)`` (its state and noise are used).
        model, x: the same model and input.
        weights: ``{penalty: weight}``, penalties from :data:`PENALTIES`.
        relative: scale each penalty to ``weight · ‖g_task‖/‖g_pen‖``; else by ``weight``.
        probes: Hutchinson vectors for ``jacobian``/``asymmetry``.
        generator: for the Hutchinson vectors.
        tol: where the ``residual`` penalty starts (:func:`penalty_value`); default: the
            tolerance of the estimate's free phase (:func:`free_tolerance`); 0: the plain
            ½ mean_b ‖F(z_b)‖².
        jac_norm, iterations, jac_bound: the ``jacobian`` penalty's norm, power-iteration
            steps and bound (:func:`penalty_value`'s ``norm``, ``iterations`` and ``bound``).

    Returns:
        The new estimate (``task_grads`` keeps the pure task gradient; ``penalties`` records
        each value and scale). A skipped estimate is returned unchanged.
    """
    if not isinstance(weights, Mapping):
        raise ConfigurationTypeError(
            f"weights must be a mapping {{penalty: weight}}; got {type(weights).__name__}"
        )
    for name, weight in weights.items():
        check_choice("penalty", name, PENALTIES)
        check_float(f"weights[{name!r}]", weight, allow_zero=True)
        if name in estimate.penalties:
            raise ConfigurationError(f"penalty {name!r} was already added to this estimate")
    check_positive_int("probes", probes)
    if tol is not None:
        check_float("tol", tol, allow_zero=True)
    check_choice("jac_norm", jac_norm, JACOBIAN_NORMS)
    check_positive_int("iterations", iterations, minimum=0)
    check_float("jac_bound", jac_bound, allow_zero=True)
    given = [f"{name}={value!r}" for name, value, default in (
        ("jac_norm", jac_norm, "frobenius"), ("iterations", iterations, POWER_ITERATIONS),
        ("jac_bound", jac_bound, 0.0)) if value != default]  # fmt: skip
    if given and "jacobian" not in weights:
        raise ConfigurationError(f"{', '.join(given)} apply to the 'jacobian' penalty only")
    if jac_norm != "spectral" and (jac_bound > 0 or iterations != POWER_ITERATIONS):
        raise ConfigurationError(
            f"{given[-1]} applies to jac_norm='spectral'; got jac_norm={jac_norm!r}"
        )
    if estimate.skipped:
        return estimate
    state = estimate.state
    if state is None:
        raise ConfigurationError("estimate has no state: pass the estimate_gradient result")
    task = estimate.task_grads if estimate.task_grads is not None else estimate.grads
    task_norm = global_norm(task)
    names, params = trainable(model)
    total = {n: g.clone() for n, g in estimate.grads.items()}
    record = dict(estimate.penalties)
    floor = free_tolerance(estimate) if tol is None else tol
    for name, weight in weights.items():
        jacobian = name == "jacobian"
        value = penalty_value(
            model, x, state, name, noise=estimate.noise, probes=probes, generator=generator,
            tol=floor, norm=jac_norm if jacobian else "frobenius",
            iterations=iterations if jacobian else POWER_ITERATIONS,
            bound=jac_bound if jacobian else 0.0,
        )  # fmt: skip
        raw = torch.autograd.grad(value, params, allow_unused=True)
        grads = {
            n: torch.zeros_like(p) if g is None else g
            for n, p, g in zip(names, params, raw, strict=True)
        }
        if relative:
            scale = relative_scale(weight, task_norm, global_norm(grads))
        else:
            scale = torch.as_tensor(float(weight), dtype=task_norm.dtype)
        for n in total:
            total[n] = total[n] + scale * grads[n]
        record[name] = {"value": value.detach(), "scale": scale.detach()}
    return dataclasses.replace(estimate, grads=total, task_grads=dict(task), penalties=record)
