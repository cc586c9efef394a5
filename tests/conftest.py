"""Shared test configuration: float64 by default, deterministic hypothesis runs."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    derandomize=True,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("GRADSTATS_HYPOTHESIS", "default"))


@pytest.fixture(autouse=True)
def _float64_and_seed():
    """Every test starts in float64 with a fixed global seed (tests still pass generators)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)
