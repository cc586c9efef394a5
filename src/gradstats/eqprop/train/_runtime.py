"""What a run sets up around its steps: CPU threads, flushed denormals, a Ctrl-C at a step boundary.

* **Threads** (:func:`auto_threads`): torch's default (one thread per core) is the wrong choice
  for the small models this trainer is mostly run with: each op is too small to split, and on a
  busy machine the threads wait on each other (a probe took 225 s instead of 4 s on a loaded
  2-core machine, a training step 24 s instead of 0.55 s). Unless ``--threads`` is given, a run
  uses ``clamp(E // 2**19, 1, torch.get_num_threads())`` threads, where E = batch · block ·
  d_model is the number of state elements one relaxation step updates (the small config,
  32 · 64 · 64 = 131,072: one thread). The previous setting is restored afterwards.
* **Denormals** (:func:`gradstats.eqprop._iterate.flush_denormal`): flushed to zero for the
  duration of the run; a backward through many relaxation steps (BPTT) otherwise runs 6-10x
  slower on x86 CPUs, with identical gradients.
* **Precision** (:func:`matmul_precision`): ``--precision tf32`` lets CUDA matmuls use TF32
  tensor cores for the run (inputs rounded to a 10-bit mantissa, float32 accumulation; not yet
  measured on a GPU here); every tensor stays float32.
* **Ctrl-C** (:class:`StepBoundary`): the first SIGINT is held until the current step has
  finished (weights, optimizer, generators and the metrics line all at one step), then raised as
  :class:`TrainingInterrupted` once the trainer saved a checkpoint at that step; a second Ctrl-C
  interrupts at once (the last checkpoint is kept: writes are atomic). Only in the main thread
  of a single process: under ``torch.distributed`` every rank would stop at a different step, so
  SIGINT keeps its default behaviour there.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import FrameType

import torch

from gradstats.eqprop._iterate import flush_denormal

__all__ = ["StepBoundary", "TrainingInterrupted", "auto_threads", "run_environment"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`~gradstats.eqprop.train.train`: a checkpoint at ``step`` was saved
    (a :class:`KeyboardInterrupt`; the message names ``--resume``)."""

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step


def auto_threads(elements: int, available: int | None = None) -> int:
    """Threads for a run whose relaxation step updates ``elements`` state elements:
    ``clamp(elements // 2**19, 1, available)`` (``available``: torch's current setting)."""
    cap = torch.get_num_threads() if available is None else available
    return max(1, min(elements // 2**19, cap))


@contextmanager
def threads(count: int) -> Iterator[int]:
    """``torch.set_num_threads(count)`` for the block; the previous setting restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)


class StepBoundary:
    """Defer the first SIGINT to the next step boundary (see the module docstring).

    ``pending`` is a plain Python flag (no device sync) that the loop reads after each step.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.pending = False
        self._previous: object = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once

    def __enter__(self) -> StepBoundary:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """``"tf32"``: CUDA matmuls and cuDNN convolutions on TF32 tensor cores (10-bit mantissa
    inputs, float32 accumulation) for the duration; ``"float32"``: unchanged. Tensors (the
    state, its residuals, the contrasts) stay float32 either way. Restored after."""
    if precision != "tf32":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextmanager
def run_environment(
    thread_count: int, *, single_process: bool, precision: str = "float32"
) -> Iterator[StepBoundary]:
    """Threads, flushed denormals, the matmul precision and the deferred Ctrl-C for one run
    (all restored after)."""
    with ExitStack() as stack:
        stack.enter_context(threads(thread_count))
        stack.enter_context(flush_denormal())
        stack.enter_context(matmul_precision(precision))
        yield stack.enter_context(StepBoundary(single_process))
