"""One optimizer step of the trainer: the estimate (or the backprop baseline), penalties, writes.

:func:`_ep_step` estimates the gradient of the token-summed cross-entropy with the run's method
(``gradstats.eqprop.estimate_gradient``), adds the stabiliser penalties
(``gradstats.eqprop.add_penalties``: relative weights, scaled from the pure task gradient),
divides by the B·T tokens and writes the gradients; :func:`_backprop_step` is an ordinary
backward of the feed-forward baseline. Both return the step's metrics record.
"""

from __future__ import annotations

import math
import warnings

import torch

from gradstats.eqprop._estimators import estimate_gradient
from gradstats.eqprop._penalties import add_penalties
from gradstats.eqprop._stats import ConvergenceWarning, write_grads
from gradstats.eqprop.train._config import TrainConfig
from gradstats.eqprop.train._distributed import reduce_backprop, reduce_estimate, shard_noise

__all__ = ["_backprop_step", "_ep_step", "_optimizer", "learning_rate"]


def _optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``lr/10``."""
    if cfg.warmup and step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _phase_record(est) -> dict[str, object]:
    free = est.stats.get("free", est.stats.get("bptt"))
    adj = est.stats.get("nudged", est.stats.get("adjoint"))
    out: dict[str, object] = {}
    if free is not None:
        s = free.summary()
        out.update(res_free=s["residual_max"], steps_free=s["steps_max"])
    if adj is not None:
        s = adj.summary()
        out.update(res_adjoint=s["residual_max"], steps_adjoint=s["steps_max"])
    phases = [s for s in est.stats.values() if s.phase != "bptt"]
    out["phases"] = len(phases)
    out["unconverged"] = sum(not s.all_converged() for s in phases)
    return out


def _ep_step(model, cfg, x, y, noise_gen, opt, tokens, group, weights=None):
    """``weights``: the step's ``{penalty: weight}`` (default ``cfg.penalties()``; the
    contraction controller passes its own)."""
    weights = cfg.penalties() if weights is None else weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # counted through the stats
        est = estimate_gradient(
            model, x, y, cfg.method, generator=noise_gen, nonfinite="skip",
            noise=shard_noise(model, x, noise_gen, group), **cfg.estimator_settings(),
        )  # fmt: skip
        if group.active:
            est, record = reduce_estimate(model, cfg, est, x, noise_gen, tokens, group, weights)
            return _write(model, opt, est, est.grads, record)
        plain = {k: v for k, v in weights.items() if k != "jacobian"}
        if not est.skipped and plain:
            est = add_penalties(
                est, model, x, plain, probes=cfg.penalty_probes, generator=noise_gen
            )
        if not est.skipped and "jacobian" in weights:
            with model.relaxation_map(cfg.step_size):  # ½‖I + εJ‖² of the iterated map
                est = add_penalties(
                    est,
                    model,
                    x,
                    {"jacobian": weights["jacobian"]},
                    probes=cfg.penalty_probes,
                    generator=noise_gen,
                    jac_norm=cfg.jac_norm,
                    iterations=cfg.power_iterations,
                    jac_bound=cfg.jac_bound,
                )
    loss = est.loss  # present on every estimate that was not skipped
    if est.skipped or loss is None:
        return est, {"skipped": True, "reason": est.reason}
    record = {"skipped": False, "train_ce": float(loss) / tokens}  # sync-ok: logging
    record.update(_phase_record(est))
    for name, pen in est.penalties.items():
        record[f"penalty.{name}"] = [float(pen["value"]), float(pen["scale"])]  # sync-ok
    return _write(model, opt, est, {n: g / tokens for n, g in est.grads.items()}, record)


def _write(model, opt, est, grads, record):
    """Write ``grads`` (already divided by the tokens) unless skipped or non-finite."""
    if record["skipped"]:
        return est, record
    if not all(bool(torch.isfinite(g).all()) for g in grads.values()):  # sync-ok: once/step
        return est, {"skipped": True, "reason": "non-finite gradient after penalties"}
    opt.zero_grad(set_to_none=True)
    write_grads(model, grads)
    return est, record


def _backprop_step(model, x, y, opt, tokens, group):
    opt.zero_grad(set_to_none=True)
    loss = model.loss(x, y)
    ok = bool(torch.isfinite(loss))  # sync-ok: once per step
    if ok:
        (loss / tokens).backward()
    if group.active:  # every rank joins the reduce, finite or not
        return reduce_backprop(model, loss, ok, tokens, group)
    if not ok:
        return {"skipped": True, "reason": "non-finite loss"}
    return {"skipped": False, "train_ce": float(loss.detach()) / tokens}  # sync-ok: logging
