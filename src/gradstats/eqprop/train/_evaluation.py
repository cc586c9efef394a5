"""Validation and the spot check: the trainer's two evaluations besides the step itself.

:func:`evaluate` relaxes with *the same* free-phase settings as the run's estimator (one
objective); :func:`spot_check` compares a step's task gradient with the implicit-function
gradient at the same weights, state noise and batch. Both work under a process group: each rank
evaluates its shard and the sums are all-reduced, so every rank gets the global number.
"""

from __future__ import annotations

import math
import warnings

import torch

from gradstats.data import CharCorpus
from gradstats.eqprop._estimators import estimate_gradient
from gradstats.eqprop._module import EquilibriumModule
from gradstats.eqprop._problem import relax
from gradstats.eqprop._stats import ConvergenceWarning, DivergenceError, GradientEstimate
from gradstats.eqprop.train._config import FreeSettings, TrainConfig, TrainModel
from gradstats.eqprop.train._distributed import (
    Group,
    draw_batch,
    reduce_reference,
    reduce_sums,
    shard_noise,
)

__all__ = ["evaluate", "spot_check"]


def evaluate(
    model: TrainModel, cfg: TrainConfig, corpus: CharCorpus, *, group: Group | None = None
) -> float:
    """Mean validation CE per token on ``eval_batches`` fixed windows (same free settings).

    With a ``group`` of W > 1 ranks (every rank must call it), each batch is the global batch of
    W·``batch_size`` windows, sharded like the training batches; the token-summed losses and
    token counts are all-reduced once at the end, so every rank returns the same number (NaN if
    the relaxation diverged on any rank).
    """
    group = group or Group()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 4)
    total, count = 0.0, 0.0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(cfg.eval_batches):
            x, y = draw_batch(corpus, "val", cfg.batch_size, cfg.block_size, gen, group)
            x, y = x.to(device), y.to(device)
            try:
                if cfg.method == "backprop" or not isinstance(model, EquilibriumModule):
                    loss = model.loss(x, y)
                else:
                    noise = shard_noise(model, x, noise_gen, group)
                    free = cfg.free_settings()
                    z, _ = relax(model, x, noise=noise, generator=noise_gen, **free)
                    loss = model.loss(z, y)
            except DivergenceError:
                total = math.nan
                break
            total += float(loss)  # sync-ok: evaluation
            count += y.numel()
    if group.active:  # one reduce after the loop: a rank that stopped early cannot deadlock
        total, count = reduce_sums([total, count], device)
    return total / max(count, 1)  # NaN if the relaxation diverged (on any rank)


def _groups_cos(
    model: EquilibriumModule, grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]
) -> tuple[float, float, str]:
    def flat(g: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
        return torch.cat([g[n].detach().double().reshape(-1) for n in names])

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        denom = float(a.norm() * b.norm())
        return float(a @ b) / denom if denom > 0 else math.nan

    names = sorted(grads)
    overall = cos(flat(grads, names), flat(ref, names))
    per = {k: cos(flat(grads, v), flat(ref, v)) for k, v in model.parameter_groups().items()}
    worst = min(per, key=lambda k: per[k] if per[k] == per[k] else math.inf)
    return overall, per[worst], worst


def spot_check(
    model: EquilibriumModule,
    cfg: TrainConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    est: GradientEstimate,
    group: Group,
) -> dict[str, object]:
    """cos(g_task, g_implicit) overall and for the worst parameter group, at the weights, noise
    and batch ``est`` used (the reference: GMRES to 1e-6; ``None`` if it failed)."""
    # bptt trains on exactly t1 steps: the reference relaxes (with the model's step size)
    free: FreeSettings = (
        {"max_steps": max(cfg.t1, 200), "step_size": None, "tol": None}
        if cfg.method == "bptt"
        else cfg.free_settings()
    )
    ref = estimate_gradient(
        model,
        x,
        y,
        "implicit",
        noise=est.noise,
        tol_adjoint=1e-6,
        max_steps_adjoint=300,
        adjoint_solver="gmres",
        nonfinite="skip",
        **free,
    )
    if group.active:  # the global reference (summed over ranks) vs the global task gradient
        grads, res_adjoint = reduce_reference(model, ref, group)
        if grads is None:
            return {"cos_implicit": None, "spot_check": "reference failed on some rank"}
    elif ref.skipped:
        return {"cos_implicit": None, "spot_check": f"reference failed: {ref.reason}"}
    else:
        grads = ref.grads
        res_adjoint = ref.stats["adjoint"].summary()["residual_max"]
    task = est.task_grads if est.task_grads is not None else est.grads
    overall, worst, name = _groups_cos(model, task, grads)
    return {
        "cos_implicit": overall,
        "cos_implicit_min": worst,
        "cos_implicit_group": name,
        "implicit_res_adjoint": res_adjoint,
    }
