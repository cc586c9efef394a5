"""Peak memory of one call: CUDA allocator statistics, or the CPU profiler's allocation events."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch

from gradstats.errors import ConfigurationError

__all__ = ["peak_memory_bytes"]


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's native start/stop log lines) for a block."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak(fn: Callable[[], object]) -> int:
    """Largest net number of bytes allocated (and not yet freed) at any point during ``fn()``.

    Reads every allocation and free event the PyTorch profiler records (``profile_memory``), so
    it counts tensor storage exactly, including tensors autograd saves for backward; memory held
    before the call does not count.
    """
    from torch.profiler import ProfilerActivity, profile

    with (
        _quiet_native_stderr(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak extra memory (bytes) that one call of ``fn`` allocates on ``device``.

    CUDA: ``max_memory_allocated`` minus the allocation before the call. CPU: the profiler's
    allocation timeline (slow: run it outside timed loops).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if device.type == "cpu":
        return _cpu_peak(fn)
    raise ConfigurationError(
        f"device must be a cpu or cuda device for memory measurement; got {device}"
    )
