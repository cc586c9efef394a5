"""The Fisher tests use tiny tensors: one intra-op thread avoids OpenMP hand-off costs that
dominate (and vary wildly) when the machine is shared."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
