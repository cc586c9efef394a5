"""Run a function on several CPU processes joined by a gloo process group (for tests)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_gloo"]


def _entry(rank: int, fn: Callable, world_size: int, folder: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(folder) / f"rank{rank}.pt")


def run_gloo(fn: Callable, world_size: int = 2, args: tuple = ()) -> list:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes, return the results.

    Each process joins a gloo process group (file rendezvous) before ``fn`` runs. ``fn`` must be
    a module-level function (it is pickled) and return what ``torch.load(weights_only=True)`` can
    read back: tensors, numbers, strings, and lists/tuples/dicts of them. Results come by rank.
    """
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(
            _entry,
            args=(fn, world_size, folder, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return [
            torch.load(Path(folder) / f"rank{r}.pt", weights_only=True) for r in range(world_size)
        ]
