"""The training loop: one estimator, one objective, every residual logged, bitwise resumable.

Each step draws a batch (``data`` generator), estimates the gradient of the token-summed
cross-entropy with the run's method (``gradstats.eqprop.estimate_gradient``; ``backprop``: an
ordinary backward of the feed-forward baseline), adds the stabiliser penalties
(``gradstats.eqprop.add_penalties``: relative weights, scaled from the pure task gradient),
divides by the B·T tokens, clips, and steps the optimizer. Validation relaxes with *the same*
free-phase settings the estimator used (``bptt``: exactly ``t1`` steps), so training and
validation evaluate one objective. A step whose estimate diverged is skipped and counted;
``max_skips`` consecutive failures, a non-finite validation loss or non-finite weights stop the
run with :class:`TrainingDiverged`, leaving the last good checkpoint in place.

Under ``torch.distributed`` (``torchrun --nproc_per_node W gradstats eqprop train ...``, or any
program that initialised the default process group before calling :func:`train`) the run is
data-parallel: ``batch_size`` is per rank, each rank estimates on its rows of the global
``W·batch_size`` batch, the token-summed gradients are all-reduced once per step and divided by
the global batch's tokens, so every rank takes the identical optimizer step — the step a single
process takes with ``batch_size = W·batch_size`` (see ``_distributed``). Every decision (skip,
divergence, validation) is taken on all-reduced numbers, identically on all ranks. Only rank 0
writes ``checkpoint.pt``, ``metrics.jsonl`` and ``curves.png`` and shows the progress bar; a
resumed run needs the same number of ranks.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gradstats.data import load_corpus
from gradstats.eqprop._estimators import estimate_gradient
from gradstats.eqprop._module import EquilibriumModule
from gradstats.eqprop._penalties import add_penalties
from gradstats.eqprop._stats import ConvergenceWarning, write_grads
from gradstats.eqprop.train._checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from gradstats.eqprop.train._config import TrainConfig
from gradstats.eqprop.train._distributed import (
    current_group,
    draw_batch,
    rank_device,
    reduce_backprop,
    reduce_estimate,
    shard_noise,
)
from gradstats.eqprop.train._evaluation import evaluate, spot_check
from gradstats.eqprop.train._metrics import MetricsLog, plot_curves, read_metrics
from gradstats.errors import ConfigurationError, DivergenceError, StateError

__all__ = ["TrainResult", "TrainingDiverged", "evaluate", "train"]

#: Options a resumed run may change; every other one comes from the checkpoint.
RESUMABLE = ("steps", "out", "resume", "progress", "threads", "device")


class TrainingDiverged(DivergenceError):
    """The run diverged and stopped; the last good checkpoint was kept (a
    :class:`~gradstats.errors.DivergenceError`)."""


@dataclass(frozen=True)
class TrainResult:
    """Where a run ended: ``step``, last ``val_ce``, counters and the run folder's files
    (``skipped_steps``: steps dropped by ``nonfinite="skip"``; alias :attr:`skipped`)."""

    step: int
    val_ce: float | None
    skipped_steps: int
    unconverged_fraction: float
    checkpoint: Path
    metrics: Path
    curves: Path

    @property
    def skipped(self) -> int:
        """Steps skipped (the name every gradstats counter uses)."""
        return self.skipped_steps


def _merge_resume(given: TrainConfig, saved: TrainConfig) -> TrainConfig:
    defaults = TrainConfig()
    clash = [
        f.name
        for f in fields(TrainConfig)
        if f.name not in RESUMABLE
        and getattr(given, f.name) != getattr(defaults, f.name)
        and getattr(given, f.name) != getattr(saved, f.name)
    ]
    if clash:
        detail = ", ".join(f"{n}={getattr(given, n)!r} (run: {getattr(saved, n)!r})" for n in clash)
        raise ConfigurationError(
            f"a resumed run keeps its configuration; these options differ: {detail}"
        )
    return replace(saved, **{name: getattr(given, name) for name in RESUMABLE})


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


def _ep_step(model, cfg, x, y, noise_gen, opt, tokens, group):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # counted through the stats
        est = estimate_gradient(
            model, x, y, cfg.method, generator=noise_gen, nonfinite="skip",
            noise=shard_noise(model, x, noise_gen, group), **cfg.estimator_settings(),
        )  # fmt: skip
        if group.active:
            est, record = reduce_estimate(model, cfg, est, x, noise_gen, tokens, group)
            return _write(model, opt, est, est.grads, record)
        weights = cfg.penalties()
        plain = {k: v for k, v in weights.items() if k != "jacobian"}
        if not est.skipped and plain:
            est = add_penalties(
                est, model, x, plain, probes=cfg.penalty_probes, generator=noise_gen
            )
        if not est.skipped and "jacobian" in weights:
            with model.relaxation_map(cfg.step_size):  # ½‖I + εJ‖²_F of the iterated map
                est = add_penalties(
                    est,
                    model,
                    x,
                    {"jacobian": weights["jacobian"]},
                    probes=cfg.penalty_probes,
                    generator=noise_gen,
                )
    if est.skipped:
        return est, {"skipped": True, "reason": est.reason}
    record = {"skipped": False, "train_ce": float(est.loss) / tokens}  # sync-ok: logging
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


def train(config: TrainConfig, *, until: int | None = None) -> TrainResult:
    """Train (or, with ``resume=True``, continue) the run ``config`` describes.

    Args:
        config: the run's options.
        until: stop after this step (writing a checkpoint), as if interrupted there.

    Under an initialised process group of W ranks every rank calls ``train`` with the same
    ``config``: ``batch_size`` is per rank (global batch W·``batch_size``), gradients are
    all-reduced, and only rank 0 writes the run folder (all ranks return after it is written).

    Returns:
        A :class:`TrainResult`.

    Raises:
        FileNotFoundError: ``--data`` or (with ``resume``) the checkpoint does not exist.
        ConfigurationError: bad options, data too short for the block size, an ``out`` that
            already holds a run (without ``resume``), a resumed run whose options differ or
            whose ``steps`` is not beyond the checkpoint's step (nothing to do).
        StateError: a corrupt checkpoint, or one trained on other data or another number of
            ranks (both are ``ValueError``s).
        TrainingDiverged: the run diverged (the last good checkpoint is kept).
    """
    cfg = config
    out = Path(cfg.out)
    group = current_group()
    state = None
    if cfg.resume:
        state = load_checkpoint(out)
        cfg = _merge_resume(cfg, TrainConfig.from_dict(state["config"]))
        ranks = int(state.get("world_size", 1))
        if ranks != group.world:
            raise StateError(
                f"the run in {out} was trained on {ranks} process(es) (global batch "
                f"{ranks}x{cfg.batch_size}); resume it with the same number, not {group.world}"
            )
        if cfg.steps <= int(state["step"]):
            raise ConfigurationError(
                f"nothing to do: the run in {out} is already at step {state['step']} and "
                f"steps={cfg.steps}; pass steps > {state['step']} (--steps) to continue it"
            )
    elif (out / CHECKPOINT).exists():
        raise ConfigurationError(
            f"{out} already holds a run: pass --resume or choose another --out"
        )
    group.barrier()  # every rank has checked/read the folder before rank 0 writes to it
    device = rank_device(cfg.device, group)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus = load_corpus(cfg.data)
    corpus.check_block_size(cfg.block_size)
    if state is not None and state["corpus"]["sha256"] != corpus.sha256:
        raise StateError(f"the data of {cfg.data or 'shakespeare_char'} differ from the run's")
    if group.main:
        out.mkdir(parents=True, exist_ok=True)
    model = cfg.build_model(corpus.vocab_size).to(device)
    opt = _optimizer(cfg, model)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    # "consecutive": failed steps in a row (checkpointed, so a resume stops where the
    # uninterrupted run would)
    counters = {"skipped": 0, "consecutive": 0, "phases": 0, "unconverged": 0}
    start = 0
    log = MetricsLog(out / "metrics.jsonl")
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        data_gen.set_state(state["rng"]["data"])
        noise_gen.set_state(state["rng"]["noise"])
        torch.set_rng_state(state["rng"]["torch"])
        counters.update(state["counters"])
        start = int(state["step"])
        if group.main:
            log.truncate(start)
    else:
        torch.manual_seed(cfg.seed)
        if group.main:
            log.path.unlink(missing_ok=True)
    ckpt_path = out / CHECKPOINT
    last_good = start

    def checkpoint(step: int) -> None:
        nonlocal last_good
        last_good = step
        if not group.main:
            return
        save_checkpoint(
            ckpt_path,
            {
                "step": step,
                "config": cfg.to_dict(),
                "model_class": type(model).__name__,
                "model_config": model.config(),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": {
                    "data": data_gen.get_state(),
                    "noise": noise_gen.get_state(),
                    "torch": torch.get_rng_state(),
                },
                "counters": dict(counters),
                "corpus": {"name": corpus.name, "sha256": corpus.sha256, "vocab": corpus.vocab},
                "world_size": group.world,
            },
        )

    if state is None:
        checkpoint(0)
    tokens = cfg.batch_size * cfg.block_size * group.world  # the global batch's
    stop = cfg.steps if until is None else min(cfg.steps, until)
    val_ce: float | None = None
    begun = time.perf_counter()
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        disable=not (cfg.progress and group.main),
        desc=f"eqprop {cfg.method}",
    )

    def diverged(step: int, why: str) -> TrainingDiverged:
        bar.close()
        if group.main:
            _plot(out, cfg)
        group.barrier()  # every rank stops at the same step (decisions use reduced numbers)
        return TrainingDiverged(
            f"training diverged at step {step} ({why}); stopped. The last good checkpoint "
            f"(step {last_good}) is kept in {ckpt_path}. Try a lower --lr, a larger --damping or "
            "a stabiliser (--jac-penalty, --homeostasis, --res-penalty)",
            phase="train",
            step=step,
        )

    for step in range(start + 1, stop + 1):
        lr = learning_rate(cfg, step)
        for param_group in opt.param_groups:
            param_group["lr"] = lr
        x, y = draw_batch(corpus, "train", cfg.batch_size, cfg.block_size, data_gen, group)
        x, y = x.to(device), y.to(device)
        est = None
        if cfg.method == "backprop":
            record = _backprop_step(model, x, y, opt, tokens, group)
        else:
            est, record = _ep_step(model, cfg, x, y, noise_gen, opt, tokens, group)
        record = {"step": step, "lr": lr, **record}
        if record["skipped"]:
            counters["skipped"] += 1
            counters["consecutive"] += 1
        else:
            counters["consecutive"] = 0
            params = [p for p in model.parameters() if p.requires_grad]
            clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            due = cfg.spot_check_every and step % cfg.spot_check_every == 0
            if due and est is not None and isinstance(model, EquilibriumModule):
                record.update(spot_check(model, cfg, x, y, est, group))  # at the weights est used
            record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip))  # sync-ok
            opt.step()
            counters["phases"] += record.get("phases", 0)
            counters["unconverged"] += record.get("unconverged", 0)
        if step % cfg.eval_every == 0 or step == stop:
            val_ce = evaluate(model, cfg, corpus, group=group)
            record["val_ce"] = val_ce
        record["time"] = time.perf_counter() - begun
        if group.main:
            log.write(record)
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())  # sync-ok
        if not finite:
            raise diverged(step, "non-finite weights")
        if counters["consecutive"] >= cfg.max_skips:
            why = f"{counters['consecutive']} consecutive failed steps: {record['reason']}"
            raise diverged(step, why)
        if val_ce is not None and not math.isfinite(val_ce):
            raise diverged(step, "non-finite validation loss")
        frac = counters["unconverged"] / max(counters["phases"], 1)
        post = {"ce": f"{record.get('train_ce', math.nan):.3f}", "val": f"{val_ce or math.nan:.3f}"}
        if "res_free" in record:
            post["res"] = f"{record['res_free']:.1e}"
        if "res_adjoint" in record:
            post["adj"] = f"{record['res_adjoint']:.1e}"
        if cfg.method != "backprop":
            post["unconv"] = f"{100 * frac:.1f}%"
        bar.set_postfix(post, refresh=False)
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == stop:
            checkpoint(step)
            if group.main:
                _plot(out, cfg)
    bar.close()
    group.barrier()  # the run folder is complete when train returns on any rank
    return TrainResult(
        step=max(stop, start),
        val_ce=val_ce,
        skipped_steps=counters["skipped"],
        unconverged_fraction=counters["unconverged"] / max(counters["phases"], 1),
        checkpoint=ckpt_path,
        metrics=log.path,
        curves=out / "curves.png",
    )


def _plot(out: Path, cfg: TrainConfig) -> None:
    path = out / "metrics.jsonl"
    if path.exists():
        plot_curves({cfg.method: read_metrics(path)}, out / "curves.png", title=f"{cfg.method}")
