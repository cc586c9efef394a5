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
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gradstats.data import CharCorpus, load_corpus
from gradstats.eqprop._estimators import estimate_gradient
from gradstats.eqprop._penalties import add_penalties
from gradstats.eqprop._problem import relax
from gradstats.eqprop._stats import ConvergenceWarning, DivergenceError, write_grads
from gradstats.eqprop.train._checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from gradstats.eqprop.train._config import TrainConfig
from gradstats.eqprop.train._metrics import MetricsLog, plot_curves, read_metrics

__all__ = ["TrainResult", "TrainingDiverged", "evaluate", "train"]

#: Options a resumed run may change; every other one comes from the checkpoint.
RESUMABLE = ("steps", "out", "resume", "progress", "threads", "device")


class TrainingDiverged(RuntimeError):
    """The run diverged and stopped; the last good checkpoint was kept."""


@dataclass(frozen=True)
class TrainResult:
    """Where a run ended: ``step``, last ``val_ce``, counters and the run folder's files."""

    step: int
    val_ce: float | None
    skipped_steps: int
    unconverged_fraction: float
    checkpoint: Path
    metrics: Path
    curves: Path


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
        raise ValueError(f"a resumed run keeps its configuration; these options differ: {detail}")
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


def evaluate(model: torch.nn.Module, cfg: TrainConfig, corpus: CharCorpus) -> float:
    """Mean validation CE per token on ``eval_batches`` fixed windows (same free settings)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 4)
    total, count = 0.0, 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(cfg.eval_batches):
            x, y = corpus.batch("val", cfg.batch_size, cfg.block_size, generator=gen)
            x, y = x.to(device), y.to(device)
            try:
                if cfg.method == "backprop":
                    loss = model.loss(x, y)
                else:
                    z, _ = relax(model, x, generator=noise_gen, **cfg.free_settings())
                    loss = model.loss(z, y)
            except DivergenceError:
                return math.nan
            total += float(loss)  # sync-ok: evaluation
            count += y.numel()
    return total / count


def _groups_cos(model, grads, ref) -> tuple[float, float, str]:
    def flat(g, names):
        return torch.cat([g[n].detach().double().reshape(-1) for n in names])

    def cos(a, b):
        denom = float(a.norm() * b.norm())
        return float(a @ b) / denom if denom > 0 else math.nan

    names = sorted(grads)
    overall = cos(flat(grads, names), flat(ref, names))
    per = {k: cos(flat(grads, v), flat(ref, v)) for k, v in model.parameter_groups().items()}
    worst = min(per, key=lambda k: per[k] if per[k] == per[k] else math.inf)
    return overall, per[worst], worst


def _spot_check(model, cfg: TrainConfig, x, y, est) -> dict[str, object]:
    free = {"max_steps": max(cfg.t1, 200)} if cfg.method == "bptt" else cfg.free_settings()
    free = {k: v for k, v in free.items() if k != "tol" or cfg.method != "bptt"}
    ref = estimate_gradient(
        model,
        x,
        y,
        "implicit",
        noise=est.noise,
        tol_adjoint=1e-6,
        max_steps_adjoint=300,
        adjoint_solver="gmres",
        on_failure="skip",
        **free,
    )
    if ref.skipped:
        return {"cos_implicit": None, "spot_check": f"reference failed: {ref.reason}"}
    task = est.task_grads if est.task_grads is not None else est.grads
    overall, worst, group = _groups_cos(model, task, ref.grads)
    return {
        "cos_implicit": overall,
        "cos_implicit_min": worst,
        "cos_implicit_group": group,
        "implicit_res_adjoint": ref.stats["adjoint"].summary()["residual_max"],
    }


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


def _ep_step(model, cfg, x, y, noise_gen, opt, tokens):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # counted through the stats
        est = estimate_gradient(
            model, x, y, cfg.method, generator=noise_gen, on_failure="skip",
            **cfg.estimator_settings(),
        )  # fmt: skip
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
    grads = {n: g / tokens for n, g in est.grads.items()}
    if not all(bool(torch.isfinite(g).all()) for g in grads.values()):  # sync-ok: once/step
        return est, {"skipped": True, "reason": "non-finite gradient after penalties"}
    opt.zero_grad(set_to_none=True)
    write_grads(model, grads)
    return est, record


def _backprop_step(model, x, y, opt, tokens):
    opt.zero_grad(set_to_none=True)
    loss = model.loss(x, y)
    if not bool(torch.isfinite(loss)):  # sync-ok: once per step
        return {"skipped": True, "reason": "non-finite loss"}
    (loss / tokens).backward()
    return {"skipped": False, "train_ce": float(loss.detach()) / tokens}  # sync-ok: logging


def train(config: TrainConfig, *, until: int | None = None) -> TrainResult:
    """Train (or, with ``resume=True``, continue) the run ``config`` describes.

    Args:
        config: the run's options.
        until: stop after this step (writing a checkpoint), as if interrupted there.

    Returns:
        A :class:`TrainResult`.

    Raises:
        FileNotFoundError: ``--data`` or (with ``resume``) the checkpoint does not exist.
        ValueError: bad options, data too short for the block size, a corrupt checkpoint, or a
            resumed run whose options or data differ from the checkpoint's.
        TrainingDiverged: the run diverged (the last good checkpoint is kept).
    """
    cfg = config
    out = Path(cfg.out)
    state = None
    if cfg.resume:
        state = load_checkpoint(out)
        cfg = _merge_resume(cfg, TrainConfig.from_dict(state["config"]))
    elif (out / CHECKPOINT).exists():
        raise ValueError(f"{out} already holds a run: pass --resume or choose another --out")
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus = load_corpus(cfg.data)
    corpus.check_block_size(cfg.block_size)
    if state is not None and state["corpus"]["sha256"] != corpus.sha256:
        raise ValueError(f"the data of {cfg.data or 'shakespeare_char'} differ from the run's")
    out.mkdir(parents=True, exist_ok=True)
    model = cfg.build_model(corpus.vocab_size).to(device)
    opt = _optimizer(cfg, model)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    counters = {"skipped": 0, "phases": 0, "unconverged": 0}
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
        log.truncate(start)
    else:
        torch.manual_seed(cfg.seed)
        log.path.unlink(missing_ok=True)
    ckpt_path = out / CHECKPOINT
    last_good = start

    def checkpoint(step: int) -> None:
        nonlocal last_good
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
            },
        )
        last_good = step

    if state is None:
        checkpoint(0)
    tokens = cfg.batch_size * cfg.block_size
    stop = cfg.steps if until is None else min(cfg.steps, until)
    val_ce: float | None = None
    consecutive = 0
    begun = time.perf_counter()
    bar = tqdm(
        total=cfg.steps, initial=start, disable=not cfg.progress, desc=f"eqprop {cfg.method}"
    )

    def diverged(step: int, why: str) -> TrainingDiverged:
        bar.close()
        _plot(out, cfg)
        return TrainingDiverged(
            f"training diverged at step {step} ({why}); stopped. The last good checkpoint "
            f"(step {last_good}) is kept in {ckpt_path}. Try a lower --lr, a larger --damping or "
            "a stabiliser (--jac-penalty, --homeostasis, --res-penalty)"
        )

    for step in range(start + 1, stop + 1):
        lr = learning_rate(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = corpus.batch("train", cfg.batch_size, cfg.block_size, generator=data_gen)
        x, y = x.to(device), y.to(device)
        est = None
        if cfg.method == "backprop":
            record = _backprop_step(model, x, y, opt, tokens)
        else:
            est, record = _ep_step(model, cfg, x, y, noise_gen, opt, tokens)
        record = {"step": step, "lr": lr, **record}
        if record["skipped"]:
            counters["skipped"] += 1
            consecutive += 1
        else:
            consecutive = 0
            params = [p for p in model.parameters() if p.requires_grad]
            clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            if est is not None and cfg.spot_check_every and step % cfg.spot_check_every == 0:
                record.update(_spot_check(model, cfg, x, y, est))  # at the weights est used
            record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip))  # sync-ok
            opt.step()
            counters["phases"] += record.get("phases", 0)
            counters["unconverged"] += record.get("unconverged", 0)
        if step % cfg.eval_every == 0 or step == stop:
            val_ce = evaluate(model, cfg, corpus)
            record["val_ce"] = val_ce
        record["time"] = time.perf_counter() - begun
        log.write(record)
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())  # sync-ok
        if not finite:
            raise diverged(step, "non-finite weights")
        if consecutive >= cfg.max_skips:
            raise diverged(step, f"{consecutive} consecutive failed steps: {record['reason']}")
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
            _plot(out, cfg)
    bar.close()
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
