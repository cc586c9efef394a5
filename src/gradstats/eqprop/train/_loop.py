"""The training loop: one estimator, one objective, every residual logged, bitwise resumable.

Each step draws a batch (``data`` generator), estimates the gradient of the token-summed
cross-entropy with the run's method (``gradstats.eqprop.estimate_gradient``; ``backprop``: an
ordinary backward of the feed-forward baseline), adds the stabiliser penalties
(``gradstats.eqprop.add_penalties``: relative weights, scaled from the pure task gradient),
divides by the B·T tokens, clips, and steps the optimizer. Validation relaxes with *the same*
free-phase settings the estimator used (``bptt``: exactly ``t1`` steps), so training and
validation evaluate one objective. A step whose estimate diverged is skipped and counted;
``max_skips`` consecutive failures, a non-finite validation loss or non-finite weights stop the
run with :class:`TrainingDiverged`, leaving the last good checkpoint in place. Ctrl-C finishes
the current step, saves a checkpoint at it and raises :class:`TrainingInterrupted` (resume with
``--resume``); the run uses :func:`auto_threads` CPU threads unless ``threads`` is given and
flushes denormal floats (see ``_runtime``). With ``contraction_target`` the penalty weights
come from the contraction controller (``_controller``: updated after each step from the free
phase's observed rate); with ``ema_decay`` a parameter EMA (``_ema``) is updated after each
optimizer step and validation evaluates it. Both are checkpointed and resume bitwise.

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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gradstats.data import load_corpus
from gradstats.eqprop._module import EquilibriumModule
from gradstats.eqprop.train._checkpoint import (
    CHECKPOINT,
    RESUME_KEYS,
    load_checkpoint,
    save_checkpoint,
)
from gradstats.eqprop.train._config import TrainConfig
from gradstats.eqprop.train._controller import ContractionController, observed_rate
from gradstats.eqprop.train._distributed import (
    current_group,
    draw_batch,
    rank_device,
    reduce_sums,
)
from gradstats.eqprop.train._ema import ParameterEMA
from gradstats.eqprop.train._evaluation import evaluate, spot_check
from gradstats.eqprop.train._metrics import MetricsLog, plot_curves, read_metrics
from gradstats.eqprop.train._resume import RESUMABLE, check_resume_state, merge_resume
from gradstats.eqprop.train._runtime import TrainingInterrupted, auto_threads, run_environment
from gradstats.eqprop.train._steps import _backprop_step, _ep_step, _optimizer, learning_rate
from gradstats.errors import ConfigurationError, DivergenceError, StateError

__all__ = [
    "RESUMABLE",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "evaluate",
    "learning_rate",
    "train",
]


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


def _resumed(cfg: TrainConfig, out: Path, world: int, explicit: Iterable[str] | None):
    """(checkpoint, config) of the run to resume in ``out``; refuses mismatches."""
    state = load_checkpoint(out, require=RESUME_KEYS)
    try:
        saved = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as error:
        raise StateError(f"{out}: the saved run configuration is invalid: {error}") from None
    cfg = merge_resume(cfg, saved, explicit)
    ranks = int(state.get("world_size", 1))
    if ranks != world:
        raise StateError(
            f"the run in {out} was trained on {ranks} process(es) (global batch "
            f"{ranks}x{cfg.batch_size}); resume it with the same number, not {world}"
        )
    if cfg.steps <= state["step"]:
        raise ConfigurationError(
            f"nothing to do: the run in {out} is already at step {state['step']} and "
            f"steps={cfg.steps}; pass steps > {state['step']} (--steps) to continue it"
        )
    return state, cfg


def train(
    config: TrainConfig, *, until: int | None = None, explicit: Iterable[str] | None = None
) -> TrainResult:
    """Train (or, with ``resume=True``, continue) the run ``config`` describes.

    Args:
        config: the run's options.
        until: stop after this step (writing a checkpoint), as if interrupted there.
        explicit: with ``resume``, the names of the options the caller gave explicitly (the
            command line passes those typed on it); each one outside ``RESUMABLE`` must equal
            the checkpoint's value. ``None``: the options that differ from their defaults.

    Under an initialised process group of W ranks every rank calls ``train`` with the same
    ``config``: ``batch_size`` is per rank (global batch W·``batch_size``), gradients are
    all-reduced, and only rank 0 writes the run folder (all ranks return after it is written).

    Returns:
        A :class:`TrainResult`.

    Raises:
        FileNotFoundError: ``--data`` or (with ``resume``) the checkpoint does not exist.
        ConfigurationError: bad options, data too short for the block size, an ``out`` that
            already holds a run (without ``resume``), a resumed run given options that differ
            from its own, or whose ``steps`` is not beyond the checkpoint's step.
        StateError: a corrupt, incomplete or tampered checkpoint (negative step, weights of
            another dtype or shape, a foreign optimizer or generator state), or one trained on
            other data or another number of ranks (both are ``ValueError``s). Nothing is
            loaded when it is raised.
        TrainingDiverged: the run diverged (the last good checkpoint is kept).
        TrainingInterrupted: Ctrl-C (a ``KeyboardInterrupt``): the checkpoint holds the last
            finished step.
    """
    cfg = config
    out = Path(cfg.out)
    group = current_group()
    state = None
    if cfg.resume:
        state, cfg = _resumed(cfg, out, group.world, explicit)
    elif (out / CHECKPOINT).exists():
        raise ConfigurationError(
            f"{out} already holds a run: pass --resume or choose another --out"
        )
    group.barrier()  # every rank has checked/read the folder before rank 0 writes to it
    device = rank_device(cfg.device, group)
    corpus = load_corpus(cfg.data)
    corpus.check_block_size(cfg.block_size)
    if state is not None and state["corpus"]["sha256"] != corpus.sha256:
        raise StateError(f"the data of {cfg.data or 'shakespeare_char'} differ from the run's")
    model = cfg.build_model(corpus.vocab_size).to(device)
    opt = _optimizer(cfg, model)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    controller, ema = _adaptive(cfg, model)
    if state is not None:  # everything checked before anything is loaded
        check_resume_state(state, model, opt, out, controller=controller, ema=ema)
    if group.main:
        out.mkdir(parents=True, exist_ok=True)
    elements = cfg.batch_size * cfg.block_size * cfg.d_model
    count = cfg.threads or auto_threads(elements)
    with run_environment(count, single_process=not group.active) as boundary:
        return _run(cfg, out, group, corpus, model, opt, data_gen, noise_gen, state, until,
                    boundary, device, controller, ema)  # fmt: skip


def _adaptive(cfg: TrainConfig, model):
    """The run's contraction controller and parameter EMA (each ``None`` when off)."""
    controller = None
    if cfg.contraction_target is not None:
        controller = ContractionController(
            cfg.contraction_target, cfg.jac_penalty, cfg.res_penalty, cfg.controller_gain
        )
    ema = ParameterEMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    return controller, ema


def _contraction(est, group, device) -> float | None:
    """q_t of the step's free phase (global under a process group; ``None``: no sample)."""
    free = est.stats.get("free", est.stats.get("bptt"))
    if free is None:
        return None
    total, count = observed_rate(free)
    if group.active:
        total, reduced = reduce_sums([total, count], device)
        count = round(reduced)
    return math.exp(total / count) if count else None


def _run(cfg, out, group, corpus, model, opt, data_gen, noise_gen, state, until, boundary,
         device, controller=None, ema=None) -> TrainResult:  # fmt: skip
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
        if controller is not None:
            controller.load_state_dict(state["controller"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
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
                **({} if controller is None else {"controller": controller.state_dict()}),
                **({} if ema is None else {"ema": ema.state_dict()}),
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
            weights = None if controller is None else controller.weights(cfg.penalties())
            est, record = _ep_step(model, cfg, x, y, noise_gen, opt, tokens, group, weights)
            if weights is not None:
                record["jac_penalty"] = weights["jacobian"]
                record["res_penalty"] = weights.get("residual", 0.0)
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
            if ema is not None:
                ema.update(model)
            if est is not None:
                record["contraction"] = _contraction(est, group, device)
                if controller is not None:
                    controller.update(record["contraction"])
                    record["contraction_smoothed"] = controller.smoothed
            counters["phases"] += record.get("phases", 0)
            counters["unconverged"] += record.get("unconverged", 0)
        if step % cfg.eval_every == 0 or step == stop:
            if ema is not None:
                record["val_ce_raw"] = evaluate(model, cfg, corpus, group=group)
            val_ce = evaluate(model if ema is None else ema.model(model), cfg, corpus, group=group)
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
        bar.set_postfix(_postfix(cfg, record, val_ce, counters), refresh=False)
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == stop or boundary.pending:
            checkpoint(step)
            if group.main and not boundary.pending:
                _plot(out, cfg)
        if boundary.pending and step < stop:  # (at the last step the run simply ends)
            bar.close()
            raise TrainingInterrupted(
                f"interrupted: step {step} saved in {ckpt_path}; continue with "
                f"'gradstats eqprop train --out {out} --resume'",
                step=step,
            )
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


def _postfix(cfg: TrainConfig, record, val_ce: float | None, counters) -> dict[str, str]:
    frac = counters["unconverged"] / max(counters["phases"], 1)
    post = {"ce": f"{record.get('train_ce', math.nan):.3f}", "val": f"{val_ce or math.nan:.3f}"}
    if "res_free" in record:
        post["res"] = f"{record['res_free']:.1e}"
    if "res_adjoint" in record:
        post["adj"] = f"{record['res_adjoint']:.1e}"
    if cfg.method != "backprop":
        post["unconv"] = f"{100 * frac:.1f}%"
    return post


def _plot(out: Path, cfg: TrainConfig) -> None:
    path = out / "metrics.jsonl"
    if path.exists():
        plot_curves({cfg.method: read_metrics(path)}, out / "curves.png", title=f"{cfg.method}")
