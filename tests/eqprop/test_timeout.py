"""Under torchrun, a rank that stops answering fails the others after ``timeout`` seconds."""

import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradstats._torchrun import torchrun_process_group

TIMEOUT, SILENT = 2.0, 15.0  # rank 1 stays silent far longer than the timeout


def _rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    with torchrun_process_group("cpu", timeout=TIMEOUT):
        if rank == 1:
            time.sleep(SILENT)  # alive, but never joins the collective
            return
        begun = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1))
            outcome = "returned"
        except RuntimeError as error:  # gloo: a plain RuntimeError; nccl: a DistError
            outcome = f"RuntimeError {' '.join(str(error).split())[:300]}"
        Path(folder, "rank0.txt").write_text(f"{outcome}\n{time.monotonic() - begun}")


def test_a_silent_rank_fails_the_collective_after_the_timeout(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank, args=(port, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")  # fmt: skip
    outcome, elapsed = (tmp_path / "rank0.txt").read_text().splitlines()
    assert outcome.startswith("RuntimeError"), outcome
    assert "timed out" in outcome.lower(), outcome
    assert float(elapsed) < SILENT - 5  # it did not wait for rank 1 to come back
