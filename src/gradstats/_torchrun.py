"""Joining the process group ``torchrun`` describes, for the commands that run under it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from gradstats.errors import ConfigurationError

__all__ = ["torchrun_process_group"]


@contextmanager
def torchrun_process_group(device: str) -> Iterator[tuple[int, int]]:
    """Yield ``(rank, world_size)``; join the group from the environment if needed.

    An initialised group is used as it is (and left alone). Otherwise, with ``WORLD_SIZE`` > 1
    (``torchrun``), the group is created — backend ``nccl`` for a CUDA ``device`` (each rank on
    ``cuda:LOCAL_RANK``), ``gloo`` otherwise — and destroyed at the end. Without either, a
    single process: ``(0, 1)``.
    """
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
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()
