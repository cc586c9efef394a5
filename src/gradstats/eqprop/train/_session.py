"""The trainer's typed records and the steps of a run that read and update them.

A run is a :class:`RunSetup` (everything resolved before the first step: options, folder,
process group, data, model, optimizer, generators, controller, EMA), a :class:`Progress` (where
it stands: first step, :class:`Counters`, last saved step, last validation loss) and, per step,
a :class:`StepResult` (the batch, the estimate and the metrics record being built) and, on
evaluation steps, an :class:`Evaluation`. Each function below does one thing to them:
:func:`restore` (load a checkpoint or seed a new run), :func:`checkpoint_payload` (what
``checkpoint.pt`` holds), :func:`apply_update` (the optimizer step a result allows, and its
counts), :func:`evaluate_due` (validation on evaluation steps), :func:`finish_record` (the
record ``metrics.jsonl`` gets) and :func:`divergence` (why the run must stop, if it must). The
loop that strings them together, the estimators and the plot are in ``_loop``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradstats.data.shakespeare_char import CharCorpus
from gradstats.eqprop._module import EquilibriumModule
from gradstats.eqprop._stats import GradientEstimate
from gradstats.eqprop.train._checkpoint import CHECKPOINT
from gradstats.eqprop.train._config import TrainConfig, TrainModel
from gradstats.eqprop.train._controller import ContractionController, observed_rate
from gradstats.eqprop.train._distributed import Group, reduce_sums
from gradstats.eqprop.train._ema import ParameterEMA
from gradstats.eqprop.train._evaluation import evaluate, spot_check
from gradstats.eqprop.train._metrics import MetricsLog
from gradstats.errors import DivergenceError

__all__ = [
    "CURVES",
    "METRICS",
    "Counters",
    "Evaluation",
    "Progress",
    "RunSetup",
    "StepResult",
    "TrainResult",
    "TrainingDiverged",
    "adaptive",
    "apply_update",
    "checkpoint_payload",
    "contraction",
    "divergence",
    "evaluate_due",
    "finish_record",
    "restore",
    "run_result",
]

METRICS, CURVES = "metrics.jsonl", "curves.png"


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


@dataclass(frozen=True)
class RunSetup:
    """Everything a run resolved before its first step (the same on every rank but ``group``).

    ``log``: the run's ``metrics.jsonl`` (written by rank 0 only); ``controller`` and ``ema``
    are ``None`` when ``contraction_target`` / ``ema_decay`` are off.
    """

    cfg: TrainConfig
    out: Path
    group: Group
    corpus: CharCorpus
    model: TrainModel
    opt: torch.optim.Optimizer
    data_gen: torch.Generator
    noise_gen: torch.Generator
    device: torch.device
    log: MetricsLog
    controller: ContractionController | None = None
    ema: ParameterEMA | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    @property
    def tokens(self) -> int:
        """Tokens of the global batch (all ranks): the gradient's divisor."""
        return self.cfg.batch_size * self.cfg.block_size * self.group.world

    def stop(self, until: int | None) -> int:
        """The last step this call runs."""
        return self.cfg.steps if until is None else min(self.cfg.steps, until)


@dataclass
class Counters:
    """The run's counts (checkpoint key ``counters``; a missing one reads as 0).

    ``consecutive``: failed steps in a row (checkpointed, so a resume stops where the
    uninterrupted run would).
    """

    skipped: int = 0
    consecutive: int = 0
    phases: int = 0
    unconverged: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @property
    def unconverged_fraction(self) -> float:
        return self.unconverged / max(self.phases, 1)


@dataclass
class Progress:
    """Where the run stands: the step it (re)started from, its counters, the last step saved
    and the last validation loss."""

    start: int
    counters: Counters
    last_good: int
    val_ce: float | None = None
    begun: float = field(default_factory=time.perf_counter)


@dataclass
class StepResult:
    """One step's batch, estimate (``None``: backprop) and metrics record (built in order:
    ``step``, ``lr``, the estimator's fields, then what :func:`apply_update` and
    :func:`finish_record` add)."""

    step: int
    x: torch.Tensor
    y: torch.Tensor
    est: GradientEstimate | None
    record: dict[str, Any]

    @property
    def skipped(self) -> bool:
        return bool(self.record["skipped"])


@dataclass(frozen=True)
class Evaluation:
    """Validation on an evaluation step: ``val_ce`` (the EMA weights' when there is an EMA)
    and ``val_ce_raw`` (the trained weights'; ``None`` without an EMA)."""

    val_ce: float
    val_ce_raw: float | None = None

    def fields(self) -> dict[str, float]:
        raw = {} if self.val_ce_raw is None else {"val_ce_raw": self.val_ce_raw}
        return {**raw, "val_ce": self.val_ce}


def adaptive(
    cfg: TrainConfig, model: torch.nn.Module
) -> tuple[ContractionController | None, ParameterEMA | None]:
    """The run's contraction controller and parameter EMA (each ``None`` when off)."""
    controller = None
    if cfg.contraction_target is not None:
        controller = ContractionController(
            cfg.contraction_target, cfg.jac_penalty, cfg.res_penalty, cfg.controller_gain
        )
    ema = ParameterEMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    return controller, ema


def restore(setup: RunSetup, state: Mapping[str, Any] | None) -> Progress:
    """Load a checked checkpoint ``state`` into the run (``None``: seed a new run) and cut
    ``metrics.jsonl`` to match (rank 0)."""
    if state is None:
        torch.manual_seed(setup.cfg.seed)
        if setup.group.main:
            setup.log.path.unlink(missing_ok=True)
        return Progress(start=0, counters=Counters(), last_good=0)
    setup.model.load_state_dict(state["model"])
    setup.opt.load_state_dict(state["optimizer"])
    setup.data_gen.set_state(state["rng"]["data"])
    setup.noise_gen.set_state(state["rng"]["noise"])
    torch.set_rng_state(state["rng"]["torch"])
    if setup.controller is not None:
        setup.controller.load_state_dict(state["controller"])
    if setup.ema is not None:
        setup.ema.load_state_dict(state["ema"])
    start = int(state["step"])
    if setup.group.main:
        setup.log.truncate(start)
    return Progress(start=start, counters=Counters(**state["counters"]), last_good=start)


def checkpoint_payload(setup: RunSetup, step: int, counters: Counters) -> dict[str, Any]:
    """What ``checkpoint.pt`` holds after ``step`` (keys: see ``_checkpoint``)."""
    model, corpus = setup.model, setup.corpus
    return {
        "step": step,
        "config": setup.cfg.to_dict(),
        "model_class": type(model).__name__,
        "model_config": model.config(),
        "model": model.state_dict(),
        "optimizer": setup.opt.state_dict(),
        "rng": {
            "data": setup.data_gen.get_state(),
            "noise": setup.noise_gen.get_state(),
            "torch": torch.get_rng_state(),
        },
        "counters": counters.as_dict(),
        "corpus": {"name": corpus.name, "sha256": corpus.sha256, "vocab": corpus.vocab},
        "world_size": setup.group.world,
        **({} if setup.controller is None else {"controller": setup.controller.state_dict()}),
        **({} if setup.ema is None else {"ema": setup.ema.state_dict()}),
    }


def contraction(est: GradientEstimate, group: Group, device: torch.device) -> float | None:
    """q_t of the step's free phase (global under a process group; ``None``: no sample)."""
    free = est.stats.get("free", est.stats.get("bptt"))
    if free is None:
        return None
    total, count = observed_rate(free)
    if group.active:
        total, reduced = reduce_sums([total, count], device)
        count = round(reduced)
    return math.exp(total / count) if count else None


def apply_update(setup: RunSetup, result: StepResult, counters: Counters) -> None:
    """Count a skipped step; otherwise spot-check (when due), clip, step the optimizer, update
    the EMA and the controller, and count the step's phases."""
    record = result.record
    if result.skipped:
        counters.skipped += 1
        counters.consecutive += 1
        return
    cfg, model, est = setup.cfg, setup.model, result.est
    counters.consecutive = 0
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    due = cfg.spot_check_every and result.step % cfg.spot_check_every == 0
    if due and est is not None and isinstance(model, EquilibriumModule):
        # at the weights est used
        record.update(spot_check(model, cfg, result.x, result.y, est, setup.group))
    record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip))  # sync-ok
    setup.opt.step()
    if setup.ema is not None:
        setup.ema.update(model)
    if est is not None:
        record["contraction"] = contraction(est, setup.group, setup.device)
        if setup.controller is not None:
            setup.controller.update(record["contraction"])
            record["contraction_smoothed"] = setup.controller.smoothed
    counters.phases += record.get("phases", 0)
    counters.unconverged += record.get("unconverged", 0)


def evaluate_due(setup: RunSetup, step: int, stop: int) -> Evaluation | None:
    """Validation at every ``eval_every``-th step and the last (``None`` on other steps)."""
    cfg, model, ema, group = setup.cfg, setup.model, setup.ema, setup.group
    if not (step % cfg.eval_every == 0 or step == stop):
        return None
    if ema is None:
        return Evaluation(evaluate(model, cfg, setup.corpus, group=group))
    raw = evaluate(model, cfg, setup.corpus, group=group)
    return Evaluation(evaluate(ema.model(model), cfg, setup.corpus, group=group), raw)


def finish_record(
    progress: Progress, result: StepResult, evaluation: Evaluation | None
) -> dict[str, Any]:
    """The step's ``metrics.jsonl`` record: the evaluation's fields and the wall ``time``."""
    record = result.record
    if evaluation is not None:
        record.update(evaluation.fields())
        progress.val_ce = evaluation.val_ce
    record["time"] = time.perf_counter() - progress.begun
    return record


def divergence(setup: RunSetup, progress: Progress, record: Mapping[str, Any]) -> str | None:
    """Why the run must stop after this step (``None``: it goes on): non-finite weights,
    ``max_skips`` failed steps in a row, or a non-finite validation loss."""
    finite = all(bool(torch.isfinite(p).all()) for p in setup.model.parameters())  # sync-ok
    if not finite:
        return "non-finite weights"
    consecutive = progress.counters.consecutive
    if consecutive >= setup.cfg.max_skips:
        return f"{consecutive} consecutive failed steps: {record['reason']}"
    if progress.val_ce is not None and not math.isfinite(progress.val_ce):
        return "non-finite validation loss"
    return None


def run_result(setup: RunSetup, progress: Progress, stop: int) -> TrainResult:
    """The :class:`TrainResult` of a run that ended after ``stop``."""
    return TrainResult(
        step=max(stop, progress.start),
        val_ce=progress.val_ce,
        skipped_steps=progress.counters.skipped,
        unconverged_fraction=progress.counters.unconverged_fraction,
        checkpoint=setup.checkpoint_path,
        metrics=setup.log.path,
        curves=setup.out / CURVES,
    )
