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

The run's state is typed (``_session``): :func:`train` resolves a ``RunSetup``, ``_run``
restores a ``Progress`` from it and strings one small function per concern together —
estimate (a ``StepResult``), update, evaluate (an ``Evaluation``), log, check, checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gradstats.data import load_corpus
from gradstats.eqprop.train._checkpoint import (
    CHECKPOINT,
    RESUME_KEYS,
    load_checkpoint,
    save_checkpoint,
)
from gradstats.eqprop.train._config import TrainConfig
from gradstats.eqprop.train._distributed import current_group, draw_batch, rank_device
from gradstats.eqprop.train._evaluation import evaluate
from gradstats.eqprop.train._metrics import MetricsLog, plot_curves, read_metrics
from gradstats.eqprop.train._resume import RESUMABLE, check_resume_state, merge_resume
from gradstats.eqprop.train._runtime import (
    StepBoundary,
    TrainingInterrupted,
    auto_threads,
    run_environment,
)
from gradstats.eqprop.train._session import (
    CURVES,
    METRICS,
    Progress,
    RunSetup,
    StepResult,
    TrainingDiverged,
    TrainResult,
    adaptive,
    apply_update,
    checkpoint_payload,
    divergence,
    evaluate_due,
    finish_record,
    restore,
    run_result,
)
from gradstats.eqprop.train._steps import _backprop_step, _ep_step, _optimizer, learning_rate
from gradstats.errors import ConfigurationError, StateError

__all__ = [
    "RESUMABLE",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "evaluate",
    "learning_rate",
    "train",
]


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
    controller, ema = adaptive(cfg, model)
    if state is not None:  # everything checked before anything is loaded
        check_resume_state(state, model, opt, out, controller=controller, ema=ema)
    if group.main:
        out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / METRICS)
    setup = RunSetup(
        cfg, out, group, corpus, model, opt, data_gen, noise_gen, device, log, controller, ema
    )
    # the relaxed state's size (a layered block holds two sub-states per token)
    elements = cfg.batch_size * cfg.block_size * getattr(model, "state_features", cfg.d_model)
    count = cfg.threads or auto_threads(elements)
    environment = run_environment(count, single_process=not group.active, precision=cfg.precision)
    with environment as boundary:
        return _run(setup, state, until, boundary)


def _run(
    setup: RunSetup, state: Mapping[str, Any] | None, until: int | None, boundary: StepBoundary
) -> TrainResult:
    """Restore the run (or save its step 0), then run its steps up to ``stop``: each one
    trained (:func:`_train_step`), checked (:func:`divergence`), shown and checkpointed."""
    progress = restore(setup, state)
    if state is None:
        _save(setup, progress, 0)
    stop = setup.stop(until)
    progress.begun = time.perf_counter()
    cfg, group = setup.cfg, setup.group
    bar = tqdm(
        total=cfg.steps,
        initial=progress.start,
        disable=not (cfg.progress and group.main),
        desc=f"eqprop {cfg.method}",
    )
    for step in range(progress.start + 1, stop + 1):
        record = _train_step(setup, progress, step, stop)
        why = divergence(setup, progress, record)
        if why is not None:
            raise _diverged(setup, progress, bar, step, why)
        bar.set_postfix(_postfix(cfg, record, progress), refresh=False)
        bar.update(1)
        _end_step(setup, progress, bar, step, stop, boundary)
    bar.close()
    group.barrier()  # the run folder is complete when train returns on any rank
    return run_result(setup, progress, stop)


def _train_step(setup: RunSetup, progress: Progress, step: int, stop: int) -> dict[str, Any]:
    """One step: estimate, update, evaluate when due; its record appended to
    ``metrics.jsonl`` (rank 0) and returned."""
    result = _estimate(setup, step)
    apply_update(setup, result, progress.counters)
    record = finish_record(progress, result, evaluate_due(setup, step, stop))
    if setup.group.main:
        setup.log.write(record)
    return record


def _estimate(setup: RunSetup, step: int) -> StepResult:
    """Set the step's learning rate, draw its batch and estimate its gradient (into
    ``.grad``, divided by the global batch's tokens)."""
    cfg, opt, group = setup.cfg, setup.opt, setup.group
    lr = learning_rate(cfg, step)
    for param_group in opt.param_groups:
        param_group["lr"] = lr
    x, y = draw_batch(setup.corpus, "train", cfg.batch_size, cfg.block_size, setup.data_gen, group)
    x, y = x.to(setup.device), y.to(setup.device)
    est = None
    if cfg.method == "backprop":
        record = _backprop_step(setup.model, x, y, opt, setup.tokens, group)
    else:
        weights = None if setup.controller is None else setup.controller.weights(cfg.penalties())
        est, record = _ep_step(
            setup.model, cfg, x, y, setup.noise_gen, opt, setup.tokens, group, weights
        )
        if weights is not None:
            record["jac_penalty"] = weights["jacobian"]
            record["res_penalty"] = weights.get("residual", 0.0)
    return StepResult(step, x, y, est, {"step": step, "lr": lr, **record})


def _save(setup: RunSetup, progress: Progress, step: int) -> None:
    """Checkpoint the run after ``step`` (rank 0 writes; every rank records it as good)."""
    progress.last_good = step
    if setup.group.main:
        save_checkpoint(setup.checkpoint_path, checkpoint_payload(setup, step, progress.counters))


def _end_step(
    setup: RunSetup, progress: Progress, bar: Any, step: int, stop: int, boundary: StepBoundary
) -> None:
    """Checkpoint (and redraw ``curves.png``) when due or at a Ctrl-C; stop at a Ctrl-C."""
    if step % setup.cfg.checkpoint_every == 0 or step == stop or boundary.pending:
        _save(setup, progress, step)
        if setup.group.main and not boundary.pending:
            _plot(setup.out, setup.cfg)
    if boundary.pending and step < stop:  # (at the last step the run simply ends)
        bar.close()
        raise TrainingInterrupted(
            f"interrupted: step {step} saved in {setup.checkpoint_path}; continue with "
            f"'gradstats eqprop train --out {setup.out} --resume'",
            step=step,
        )


def _diverged(
    setup: RunSetup, progress: Progress, bar: Any, step: int, why: str
) -> TrainingDiverged:
    """The :class:`TrainingDiverged` to raise at ``step`` (the bar closed, the curves drawn,
    every rank at the same step)."""
    bar.close()
    if setup.group.main:
        _plot(setup.out, setup.cfg)
    setup.group.barrier()  # every rank stops at the same step (decisions use reduced numbers)
    return TrainingDiverged(
        f"training diverged at step {step} ({why}); stopped. The last good checkpoint "
        f"(step {progress.last_good}) is kept in {setup.checkpoint_path}. Try a lower --lr, a "
        "larger --damping or a stabiliser (--jac-penalty, --homeostasis, --res-penalty)",
        phase="train",
        step=step,
    )


def _postfix(cfg: TrainConfig, record: Mapping[str, Any], progress: Progress) -> dict[str, str]:
    val = progress.val_ce or math.nan
    post = {"ce": f"{record.get('train_ce', math.nan):.3f}", "val": f"{val:.3f}"}
    if "res_free" in record:
        post["res"] = f"{record['res_free']:.1e}"
    if "res_adjoint" in record:
        post["adj"] = f"{record['res_adjoint']:.1e}"
    if cfg.method != "backprop":
        post["unconv"] = f"{100 * progress.counters.unconverged_fraction:.1f}%"
    return post


def _plot(out: Path, cfg: TrainConfig) -> None:
    path = out / METRICS
    if path.exists():
        every = 0 if cfg.method == "backprop" else cfg.spot_check_every  # backprop: no cosine
        plot_curves(
            {cfg.method: read_metrics(path)},
            out / CURVES,
            title=f"{cfg.method}",
            spot_check_every=every,
        )
