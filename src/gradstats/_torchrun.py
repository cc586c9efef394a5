"""Joining the process group ``torchrun`` describes, for the commands that run under it."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from gradstats.errors import ConfigurationError

__all__ = ["torchrun_process_group"]


@contextmanager
def torchrun_process_group(device: str, timeout: float | None = None) -> Iterator[tuple[int, int]]:
    """Yield ``(rank, world_size)``; join the group from the environment if needed.

    An initialised group is used as it is (and left alone; ``timeout`` does not apply to it).
    Otherwise, with ``WORLD_SIZE`` > 1 (``torchrun``), the group is created — backend ``nccl``
    for a CUDA ``device`` (each rank on ``cuda:LOCAL_RANK``), ``gloo`` otherwise — and
    destroyed at the end. Without either, a single process: ``(0, 1)``.

    Args:
        device: the torch device the ranks compute on.
        timeout: seconds a collective (and joining the group) waits for the other ranks before
            it fails with an error instead of blocking (``None``: torch's default, 30 minutes;
            nccl enforces it with ``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default).

    Raises:
        ConfigurationError: ``timeout`` is not a number > 0, or ``WORLD_SIZE`` > 1 without
            ``torch.distributed``.
    """
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
    ):
        raise ConfigurationError(f"timeout must be a number of seconds > 0; got {timeout!r}")
    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    if not dist.is_available():
        raise ConfigurationError(f"WORLD_SIZE={world} but this torch has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if cuda else "gloo"
    if timeout is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()
